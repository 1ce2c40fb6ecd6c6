"""domainfusion_bench: a DomainBed-compatible domain generalization harness for diffusion-assisted methods."""

__version__ = "0.1.0"
