"""The model both trainer and inspector use: what training and serving must agree on, and nothing else.

layers (RepVGG block, ECA), network (RepNet, reparameterize, fold_gray), bf16 (the network's bf16 serving
form), architectures (Table 1 as data), preprocess (the one resize + normalize), checkpoint (fused write /
verify / load), cam (class-activation boxes), profile (parameters and MACs), bundled (the default model). Imports torch, numpy, OpenCV and
`schemas` only.
"""
