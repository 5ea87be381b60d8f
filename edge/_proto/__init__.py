"""Generated gRPC code for proto/mitosis/edge/v1/edge.proto (``python tools/gen_proto.py``). Do not edit."""
