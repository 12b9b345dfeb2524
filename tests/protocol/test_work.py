import json
import subprocess
import sys

import pytest

from fedtrain.protocol.work import (
    WORK_KINDS,
    CodedWork,
    GradWork,
    TrainWork,
    Work,
    WorkFormatError,
    ZOWork,
    work_from_json,
    work_to_json,
)

EVERY_KIND = [
    TrainWork(steps=5),
    TrainWork(steps=3, names=["layers.0.w", "layers.1.w"], fragment=1, apply_at=2, alpha=0.25),
    TrainWork(steps=7, group=4),
    CodedWork(steps=4, names=None, shards=[0, 2], coeffs=[0.5, -1.25], step0=12),
    GradWork(steps=1),
    ZOWork(
        steps=8,
        names=["codes"],
        eps=1e-3,
        scale=0.125,
        perturbation="rademacher",
        perturbed=["embed.weight", "norm.weight"],
    ),
]


@pytest.mark.parametrize("work", EVERY_KIND, ids=lambda w: f"{w.kind}-{w.steps}")
def test_every_kind_round_trips_exactly_through_json(work: Work):
    text = json.dumps(work_to_json(work))
    back = work_from_json(json.loads(text))
    assert type(back) is type(work) and back == work
    assert work_to_json(back) == json.loads(text)


def test_every_kind_is_registered_and_tested():
    assert {type(w) for w in EVERY_KIND} == set(WORK_KINDS.values())
    assert set(WORK_KINDS) == {"train", "coded", "grad", "zo"}


def test_the_json_form_is_flat_and_names_the_kind():
    assert work_to_json(TrainWork(steps=3, fragment=2)) == {
        "kind": "train",
        "steps": 3,
        "names": None,
        "fragment": 2,
        "apply_at": 0,
        "alpha": 0.0,
        "group": None,
    }


def test_zo_reply_shapes_come_from_the_sample_count():
    zo = EVERY_KIND[-1]
    assert zo.reply_shapes() == {"codes": [8]}
    assert TrainWork(steps=2).reply_shapes() is None


# What the commit record held before the typed work: [round, kind, steps, names, extra].
LEGACY = [
    (
        [3, "train", 4, ["a"], {"fragment": 1, "apply_at": 2, "alpha": 0.5}],
        TrainWork(steps=4, names=["a"], fragment=1, apply_at=2, alpha=0.5),
    ),
    ([2, "train", 6, None, {"group": 0}], TrainWork(steps=6, group=0)),
    ([1, "train", 5, None, {}], TrainWork(steps=5)),
    (
        [1, "coded", 3, None, {"shards": [1, 2], "coeffs": [1.0, 2.0], "step0": 6}],
        CodedWork(steps=3, shards=[1, 2], coeffs=[1.0, 2.0], step0=6),
    ),
    ([4, "grad", 1, None, {}], GradWork(steps=1)),
    (
        [
            2,
            "zo",
            8,
            ["codes"],
            {
                "shapes": {"codes": [8]},
                "zo_eps": 0.001,
                "zo_scale": 1.0,
                "zo_perturbation": "gaussian",
                "zo_names": ["w"],
            },
        ],
        ZOWork(
            steps=8, names=["codes"], eps=0.001, scale=1.0, perturbation="gaussian", perturbed=["w"]
        ),
    ),
]


@pytest.mark.parametrize("entry,want", LEGACY, ids=lambda x: str(x)[:24])
def test_the_legacy_commit_record_list_is_read(entry, want):
    assert work_from_json(json.loads(json.dumps(entry))[1:]) == want


def test_the_legacy_header_with_extra_is_read():
    header = {"kind": "train", "steps": 2, "names": None, "extra": {"apply_at": 1, "alpha": 0.0}}
    assert work_from_json(header) == TrainWork(steps=2, apply_at=1)


def test_an_int_is_accepted_for_a_float_field_and_stays_a_float():
    back = work_from_json({"kind": "train", "steps": 2, "alpha": 1})
    assert back.alpha == 1.0 and isinstance(back.alpha, float)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"kind": "rl", "steps": 1}, r"unknown work kind 'rl' \(known: train, coded, grad, zo\)"),
        ({"steps": 1}, "unknown work kind None"),
        ({"kind": "train", "steps": 1, "shards": [0]}, "train work has no field 'shards'"),
        ({"kind": "coded", "steps": 1, "shards": [0], "coeffs": [1.0]}, "lacks the field 'step0'"),
        ({"kind": "train", "names": None}, "train work lacks the field 'steps'"),
        ({"kind": "train", "steps": "3"}, "train work field 'steps': '3' is not int"),
        ({"kind": "train", "steps": True}, "field 'steps': True is not int"),
        ({"kind": "train", "steps": 1, "names": "a"}, r"field 'names': 'a' is not list\[str\]"),
        ({"kind": "train", "steps": 1, "names": [1]}, "field 'names'"),
        ({"kind": "zo", "steps": 1, "eps": "x"}, "zo work field 'eps'"),
        ({"kind": "train", "steps": 1, "extra": []}, "'extra' must be a JSON object"),
        ({"kind": "zo", "steps": 1, "eps": 1.0, "extra": {"zo_eps": 2.0}}, "'eps' twice"),
        (["train", 1, None], r"must be \[kind, steps, names, extra\], got 3 items"),
        ("train", "must be a JSON object, got str"),
        (7, "must be a JSON object, got int"),
    ],
)
def test_bad_work_is_refused_with_a_named_error(data, match):
    with pytest.raises(WorkFormatError, match=match):
        work_from_json(data)
    assert issubclass(WorkFormatError, ValueError)


def test_an_unregistered_work_class_is_refused():
    with pytest.raises(WorkFormatError, match="not a registered kind of work"):
        work_to_json(Work(steps=1))


def test_protocol_work_imports_without_torch():
    code = (
        "import sys; from fedtrain.protocol import TrainWork, work_to_json; "
        "work_to_json(TrainWork(steps=1)); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
