"""Layer implementations that normswap swaps in; each names the paper it comes from."""
