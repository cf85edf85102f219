"""A chunk's attention over its stored past: the two-part (past + own) contract, per-device kernels with a
first-use self-check, and streaming of a host-resident past (offload)."""
