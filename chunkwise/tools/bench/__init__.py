"""`chunkwise bench`: step time and peak memory per (method, length), each case in a fresh process."""
