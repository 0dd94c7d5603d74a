"""Every shipped config composes and validates; bad values are all reported at once."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from cluster.config import CONF_DIR, job_from_config
from shards.errors import ConfigError


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["task.output=/tmp/x/out.mp4", *overrides])


@pytest.mark.parametrize("models", ["musetalk_v15", "tiny"])
@pytest.mark.parametrize("enhance", ["none", "gfpgan"])
@pytest.mark.parametrize("cluster", ["local", "remote"])
def test_every_config_composes(models, enhance, cluster):
    cfg = _compose("+task=test", f"models={models}", f"enhance={enhance}", f"cluster={cluster}")
    job = job_from_config(cfg)
    assert job.video.name == "demo.mp4" and job.video.is_absolute()
    assert job.pipeline.tiny == (models == "tiny")
    assert job.pipeline.face.detector == ("haar" if models == "tiny" else "s3fd")
    assert job.pipeline.enhance.enabled == (enhance == "gfpgan")
    assert job.cluster.address == ("auto" if cluster == "remote" else "")


def test_interface_names():
    cfg = _compose(
        "+task=test",
        "task.bbox_shift=-7",
        "render.batch_size=3",
        "render.dtype=float16",
        "shards.length=20",
        "shards.prep_length=32",
        "output.lossless=true",
        "enhance=gfpgan",
        "enhance.upscale=2",
        "cluster.workers=3",
        "cluster.gpus_per_worker=0.5",
        "models.dir=/somewhere",
    )
    job = job_from_config(cfg)
    assert job.pipeline.face.bbox_shift == -7
    assert job.pipeline.batch_size == 3 and job.pipeline.dtype == "float16"
    assert (job.shards.length, job.shards.prep_length) == (20, 32)
    assert job.encode.lossless and job.pipeline.enhance.upscale == 2
    assert job.cluster.workers == 3 and job.cluster.gpus_per_worker == 0.5
    assert job.pipeline.models_dir == "/somewhere"


def test_missing_task_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"task.video is required .*\+task=test"):
        job_from_config(_compose())


def test_all_problems_reported_at_once():
    cfg = _compose(
        "+task=test",
        "face.detector=yolo",
        "render.batch_size=0",
        "enhance.upscale=3",
        "shards.prep_length=0",
        "cluster.inputs=ftp",
        "+face.colour=red",
    )
    with pytest.raises(ConfigError) as err:
        job_from_config(cfg)
    msg = str(err.value)
    for needle in (
        "face.detector",
        "render.batch_size",
        "enhance.upscale",
        "shards.prep_length",
        "cluster.inputs",
        "face.colour is not a known setting",
    ):
        assert needle in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("render.batch_size=abc", "render.batch_size must be an integer, got 'abc'"),
        ("render.batch_size=2.5", "render.batch_size must be an integer, got 2.5"),
        ("render.batch_size=true", "render.batch_size must be an integer, got True"),
        ("render.threads=two", "render.threads must be an integer or null, got 'two'"),
        ("shards.length=x", "shards.length must be an integer or null, got 'x'"),
        ("shards.prep_length=null", "shards.prep_length must be an integer, got null"),
        ("cache.enabled=maybe", "cache.enabled must be a boolean (true or false), got 'maybe'"),
        ("output.lossless=yes", "output.lossless must be a boolean (true or false), got 'yes'"),
        ("output.summary=1", "output.summary must be a boolean (true or false), got 1"),
        ("blend.parsing=0", "blend.parsing must be a boolean (true or false), got 0"),
        ("task.make_demo=sure", "task.make_demo must be a boolean (true or false), got 'sure'"),
        ("blend.expand=wide", "blend.expand must be a number, got 'wide'"),
        ("cluster.start_timeout_s=nan", "cluster.start_timeout_s must be a number, got nan"),
        ("cluster.connect_timeout_s=soon", "cluster.connect_timeout_s must be a number, got 'soon'"),
        ("task.bbox_shift=up", "task.bbox_shift must be an integer, got 'up'"),
        ("face.detector=3", "face.detector must be a string, got 3"),
    ],
)
def test_mistyped_values_are_named_not_tracebacks(override, needle):
    with pytest.raises(ConfigError) as err:
        job_from_config(_compose("+task=test", *override.split()))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_numbers_are_accepted_where_floats_are_expected():
    job = job_from_config(_compose("+task=test", "shards.length=null", "shards.seconds=2", "blend.expand=2"))
    assert job.shards.seconds == 2.0 and isinstance(job.shards.seconds, float)
    assert job.pipeline.blend.expand == 2.0


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "mps"])
def test_device_names_accepted(device):
    assert job_from_config(_compose("+task=test", f"render.device={device}")).pipeline.device == device


@pytest.mark.parametrize(
    "device",
    ["tpu", "gpu", "CPU", "cuda:", "cuda:x", "cuda:0:1", "xla", "cuda 0"],
    ids=lambda d: f"device={d}",  # a bare "gpu" id would read as the gpu marker and be skipped
)
def test_device_names_refused(device):
    with pytest.raises(ConfigError, match=r"render.device must be auto, cpu, cuda, cuda:N or mps"):
        job_from_config(_compose("+task=test", f"render.device='{device}'"))


def test_device_index_must_be_visible_to_a_worker():
    with pytest.raises(ConfigError, match=r"render.device=cuda:1 names GPU 1.*use render.device=cuda"):
        job_from_config(_compose("+task=test", "render.device=cuda:1"))
    job = job_from_config(_compose("+task=test", "render.device=cuda:1", "cluster.gpus_per_worker=2"))
    assert job.pipeline.device == "cuda:1"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "cluster.gpus_per_worker=0",
            "cluster.gpus_per_worker must be a fraction in (0, 1] or a whole number",
        ),
        (
            "cluster.gpus_per_worker=-1",
            "cluster.gpus_per_worker must be a fraction in (0, 1] or a whole number",
        ),
        (
            "cluster.gpus_per_worker=1.5",
            "cluster.gpus_per_worker must be a fraction in (0, 1] or a whole number",
        ),
        ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker must be > 0"),
        ("cluster.cpu_workers=0", "cluster.cpu_workers must be >= 1"),
        ("cluster.num_cpus=0", "cluster.num_cpus must be >= 1 or null"),
        ("cluster.start_timeout_s=0", "cluster.start_timeout_s must be > 0"),
        ("cluster.connect_timeout_s=0", "cluster.connect_timeout_s must be > 0, got 0.0"),
        ("cluster.connect_timeout_s=-5", "cluster.connect_timeout_s must be > 0, got -5.0"),
        ("cluster.max_workers=0", "cluster.max_workers must be >= 1 or null"),
        ("cluster.max_workers=4 cluster.workers=2", "cluster.max_workers=4 does nothing with a fixed"),
        ("face.extra_margin=-1", "face.extra_margin must be >= 0"),
        ("blend.expand=0.9", "blend.expand must be >= 1"),
        ("blend.ellipse_feather=1.5", "blend.ellipse_feather must be in [0, 1]"),
        ("output.preset=fastest", "output.preset must be one of"),
        ("+output.gop=0", "output.gop must be >= 1 or null"),
    ],
)
def test_out_of_range_values(override, needle):
    with pytest.raises(ConfigError) as err:
        job_from_config(_compose("+task=test", *override.split()))
    assert needle in str(err.value)


def test_mistyped_and_out_of_range_reported_together():
    cfg = _compose("+task=test", "render.batch_size=abc", "shards.length=x", "cluster.cpus_per_worker=0")
    with pytest.raises(ConfigError) as err:
        job_from_config(cfg)
    msg = str(err.value)
    assert "render.batch_size" in msg and "shards.length" in msg and "cluster.cpus_per_worker" in msg
    assert "set shards.length (frames) or shards.seconds" not in msg  # no knock-on noise from the bad type


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["enhance=none", "enhance.upscale=2"], "enhance.upscale=2 does nothing with enhancement off"),
        (["blend.parsing=false", "blend.mode=raw"], "blend.mode=raw does nothing with blend.parsing=false"),
        (["output.lossless=true", "output.crf=23"], "output.crf=23 does nothing with output.lossless=true"),
        (["render.device=cpu", "render.dtype=bf16"], "render.dtype=bf16 does nothing on render.device=cpu"),
    ],
)
def test_settings_that_do_nothing_are_refused(overrides, needle):
    """A no-op setting would make a sweep render byte-identical duplicates: one line names it and its fix."""
    with pytest.raises(ConfigError) as err:
        job_from_config(_compose("+task=test", *overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["enhance=gfpgan", "enhance.upscale=2"],
        ["blend.parsing=true", "blend.mode=raw"],
        ["output.lossless=false", "output.crf=23"],
        ["render.device=auto", "render.dtype=bf16"],
    ],
)
def test_the_same_settings_are_accepted_where_they_act(overrides):
    job_from_config(_compose("+task=test", *overrides))


def test_the_yaml_agrees_with_the_typed_defaults(monkeypatch):
    """The typed config's defaults are the one source (code that runs without Hydra uses them): the
    shipped YAML, composed with its default groups, holds the same value for every field it names, and
    names every scalar field of the groups it configures."""
    from dataclasses import MISSING, fields

    from omegaconf import OmegaConf

    from cluster.config import CacheConfig, ClusterConfig, QaConfig, SweepConfig
    from musetalk.config import BlendConfig, EnhanceConfig, FaceConfig, PipelineConfig
    from shards.plan import ShardsConfig
    from shards.segment import EncodeSettings

    monkeypatch.delenv("MUSETALK_CACHE_DIR", raising=False)
    cfg = OmegaConf.to_container(_compose(), resolve=False)
    groups = [
        (FaceConfig, "face", {"bbox_shift"}),  # task.bbox_shift
        (BlendConfig, "blend", set()),
        (EnhanceConfig, "enhance", set()),
        (PipelineConfig, "render", {"models_dir", "tiny", "face", "blend", "enhance"}),  # models.*, groups
        (ClusterConfig, "cluster", set()),
        (CacheConfig, "cache", set()),
        (QaConfig, "qa", set()),
        (SweepConfig, "sweep", set()),
        (ShardsConfig, "shards", set()),
        (EncodeSettings, "output", {"gop"}),  # gop: x264's default unless +output.gop is given
    ]
    for cls, group, elsewhere in groups:
        node = cfg[group]
        for f in fields(cls):
            if f.name in elsewhere:
                continue
            assert f.name in node, f"{group}.{f.name} is missing from the YAML"
            default = f.default if f.default is not MISSING else f.default_factory()
            value = node[f.name]
            if isinstance(value, str) and value.startswith("${oc.env:"):  # the default after the env var
                value = value.split(",", 1)[1].rstrip("}").strip("'")
            assert value == default, f"{group}.{f.name}: YAML {value!r}, typed default {default!r}"


def test_dub_mode_settings(tmp_path):
    """task.mode / task.segments: audio mode by default (+task=test too), dub with or without ranges; a
    bad segments file or a segments file outside dub mode is refused at config time."""
    from shards.dub import DubSettings

    assert job_from_config(_compose("+task=test")).dub is None
    assert job_from_config(_compose("+task=test", "task.mode=dub")).dub == DubSettings()
    good = tmp_path / "s.csv"
    good.write_text("start,end,face\n0,1.5,left\n")
    assert job_from_config(
        _compose("+task=test", "task.mode=dub", f"task.segments={good}")
    ).dub == DubSettings(good)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"start": 0, "end": 2}, {"start": 1, "end": 3}]')
    cases = [
        (["task.mode=lipsync"], "task.mode must be audio or dub, got 'lipsync'"),
        ([f"task.segments={good}"], f"task.segments={good} needs task.mode=dub"),
        (["task.mode=dub", f"task.segments={bad}"], f"segments file {bad}: entry 2 overlaps entry 1"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match="invalid configuration") as err:
            job_from_config(_compose("+task=test", *overrides))
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "value, typed", [("largest", "largest"), ("center", "center"), ("2", "2"), ("'3'", "3")]
)
def test_face_select_values(value, typed):
    assert job_from_config(_compose("+task=test", f"face.select={value}")).pipeline.face.select == typed


@pytest.mark.parametrize("value", ["biggest", "0", "-1", "true"])
def test_face_select_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"face.select") as err:
        job_from_config(_compose("+task=test", f"face.select={value}"))
    assert "\n" not in str(err.value)
