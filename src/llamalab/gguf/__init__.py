"""GGUF (llama.cpp's file format) as a library of its own, like gguf-py.

- ``header``: the one parser of a file's metadata and tensor table, validated against the
  file's size, and the magic check;
- ``tensors``: one tensor's data read from the file, as stored bytes or as float32;
- ``dequant``: every supported block layout, dequantized bit-exactly as gguf-py does;
- ``writer``: tensor types, their encoding, and streamed output that llama.cpp loads.

It imports nothing of llamalab above it (``llamalab.errors`` only): what a model's file
means is ``checkpoint.gguf_format``'s, and its vocabulary ``tokenizer``'s.

Importing this package imports nothing heavy: ``header`` needs only numpy, so
tokenizers and ``llamalab info`` can read a header without loading torch.
"""

# The tensor types `llamalab convert --to gguf --dtype` writes, all by gguf-py's quantizers
# (which its own tests hold bit-exact to llama.cpp's C code).
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
WRITE_TYPES = FLOAT_TYPES + QUANT_TYPES
