"""The controller API: the .proto, its generated code, and the frozen model types.

This package is the one contract every node imports. Only ``wire``, ``client``
and ``controller.service`` import the generated ``_pb2`` modules.
"""
