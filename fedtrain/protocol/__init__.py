"""What crosses a process boundary: typed work and its JSON form, the run manifest, the silo
daemon's local-socket frames and Flower record conversion.

Names are imported lazily: the mailbox ClientApp starts once per Flower message and must not
import torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

__all__ = [
    "WORK_KINDS",
    "CodedWork",
    "GradWork",
    "LocalAPIError",
    "TrainWork",
    "Work",
    "WorkFormatError",
    "ZOWork",
    "build_manifest",
    "check_manifest",
    "from_content",
    "read_frame",
    "request",
    "to_content",
    "work_from_json",
    "work_to_json",
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
    **{
        name: "fedtrain.protocol.work"
        for name in (
            "WORK_KINDS",
            "CodedWork",
            "GradWork",
            "TrainWork",
            "Work",
            "WorkFormatError",
            "ZOWork",
            "work_from_json",
            "work_to_json",
        )
    },
}

__getattr__ = lazy(__name__, _WHERE)
