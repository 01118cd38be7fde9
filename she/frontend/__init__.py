"""Reading an HE-friendly ONNX model: loading and checking it, the supported operators as numpy maps,
lowering to affine maps and squares, and the plaintext tail the client re-applies."""
