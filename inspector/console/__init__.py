"""`inspector console`: a live page of the defect events the line produces, with the frames' pictures.

A downstream consumer of the events topic (and the dead-letter topic), like any alarm system: it never
reaches into a running inspector. settings → reader (Kafka in) → board (wall + figures, bounded) →
server (aiohttp: page, stream, pictures via pictures.py) ; app.py puts them together.
"""
