"""Start clusters beyond this machine: over SSH, and as batch jobs of HPC schedulers (SLURM, PBS, SGE, LSF)."""
