"""Everything GGUF (llama.cpp's file format), in one place.

- ``header``: the one parser of a file's metadata and tensor table, and the magic check;
- ``reader``: a GGUF file as a checkpoint (config from ``llama.*`` metadata, tensors);
- ``dequant``: every supported block layout, dequantized bit-exactly as gguf-py does;
- ``writer``: streamed GGUF output that llama.cpp loads;
- ``vocab``: a tokenizer written as ``tokenizer.ggml.*`` metadata.

Importing this package imports nothing heavy: ``header`` needs only numpy, so
tokenizers and ``llamalab info`` can read a header without loading torch.
"""
