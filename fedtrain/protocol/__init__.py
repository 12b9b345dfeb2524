"""What crosses a process boundary: the run manifest, the silo daemon's local-socket frames and
Flower record conversion.

Names are imported lazily: the mailbox ClientApp starts once per Flower message and must not
import torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

__all__ = [
    "LocalAPIError",
    "build_manifest",
    "check_manifest",
    "from_content",
    "read_frame",
    "request",
    "to_content",
    "write_frame",
]

_WHERE = {
    "LocalAPIError": "fedtrain.protocol.localapi",
    "read_frame": "fedtrain.protocol.localapi",
    "request": "fedtrain.protocol.localapi",
    "write_frame": "fedtrain.protocol.localapi",
    "build_manifest": "fedtrain.protocol.manifest",
    "check_manifest": "fedtrain.protocol.manifest",
    "from_content": "fedtrain.protocol.records",
    "to_content": "fedtrain.protocol.records",
}

__getattr__ = lazy(__name__, _WHERE)
