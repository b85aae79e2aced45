"""Several GPUs per worker: exact CFG-parallel and Ulysses sequence-parallel denoising.

* :mod:`.layout`: CFG degree x Ulysses degree from the number of ranks;
* :mod:`.group`: the process groups (NCCL on GPUs, gloo on the CPU; explicit collective timeout);
* :mod:`.exchange`: the Ulysses all-to-all between a token split and a head split;
* :mod:`.sharded`: the main transformer's forward on one rank's share of the video tokens;
* :mod:`.denoise`: rank 0's model function computed by all ranks, and the other ranks' loop;
* :mod:`.launch`: starting, watching and ending the other ranks.

Every layout computes the serial result up to float rounding (``tests/parallel``).
"""
