"""What the tests share. Test modules import these helpers and the code under test, never each other.

- streams: frames, producing and reading topics, committed positions, the inspector in this process;
- harness: the inspector as a subprocess, a live tail of a topic, a live stream of frames, figures;
- poison: every way a record can be unusable, generated, with the dead-letter reason it must get;
- models: tiny checkpoints and BN statistics worth testing against;
- images: colour and gray image folders on disk, and the X-SDD development set (skips when absent);
- deploy: the files under deploy/, parsed;
- http: one blocking GET;
- gpu: the CUDA skip, reference frames (NEU-CLS or synthetic), the GPU side of a profiler trace;
- hostile: hostile model versions, each with the rejection it must get;
- console: `inspector console` as a subprocess, and headless Chromium driven by Selenium;
- commits: a commit policy that has already fetched records;
- metrics: readings of the inspector's metrics object (model reloads).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NEU_CLS = REPO_ROOT / "../shared/datasets/neu-cls"
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
