"""Generated QEMU scenarios with the VFIO emulation's DMA log as the oracle (issue 11).

model.py       typed scenario model, rendered to a QEMU argv (+ -readconfig file)
strategies.py  hypothesis strategies over the model (seeded, shrinking)
runner.py      start QEMU with the emulation, play hot-plug/unplug, read the truth,
               run qmpguard in-process, audit every command it sent
oracle.py      per-device truth vs qmpguard's verdict: the disagreement classes
corpus.py      explicit regression scenarios, one per class of issue 11
"""
