"""The bottom layer of farm: identities and hashing (ids), quantization methods as farm uses them
(methods), the content-addressed stage cache (cache) and small shared pieces (node, errors). It imports
nothing from the layers above (docs/architecture.md)."""
