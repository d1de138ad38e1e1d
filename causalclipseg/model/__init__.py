"""The CausalCLIPSeg network and its parts (encoders, decoder, causal intervention), and the U-Net baseline."""
