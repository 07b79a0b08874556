"""The HF architectures vLLM loads (its ModelRegistry), as a JSON list on stdout.

Runs with the vLLM virtualenv's Python (cortex/engines/registry.py).
"""

import json

from vllm.model_executor.models.registry import ModelRegistry

print(json.dumps(sorted(ModelRegistry.get_supported_archs())))
