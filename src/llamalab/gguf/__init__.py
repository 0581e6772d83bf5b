"""Everything GGUF (llama.cpp's file format), in one place.

- ``header``: the one parser of a file's metadata and tensor table, and the magic check;
- ``reader``: a GGUF file as a checkpoint (config from ``llama.*`` metadata, tensors);
- ``dequant``: every supported block layout, dequantized bit-exactly as gguf-py does;
- ``writer``: streamed GGUF output that llama.cpp loads;
- ``vocab``: a tokenizer written as ``tokenizer.ggml.*`` metadata.

Importing this package imports nothing heavy: ``header`` needs only numpy, so
tokenizers and ``llamalab info`` can read a header without loading torch.
"""

# The tensor types `llamalab convert --to gguf --dtype` writes, all by gguf-py's quantizers
# (which its own tests hold bit-exact to llama.cpp's C code).
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
WRITE_TYPES = FLOAT_TYPES + QUANT_TYPES
