"""botocore's models kept decoded on disk: the same clients as botocore's own, built without its JSON."""
import os
import stat

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import pytest

from ganymede.stores import botomodels

REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1", "us-gov-west-1", "eu-isoe-west-1"]


def _client(session, region, **config):
    return boto3.session.Session(botocore_session=session).client(
        "s3", region_name=region, aws_access_key_id="k", aws_secret_access_key="s",
        config=botocore.config.Config(**config))


def _json_loads(monkeypatch):
    """Counts the JSON files botocore parses from now on."""
    loaded = []
    real = botocore.loaders.JSONFileLoader.load_file

    def load_file(self, file_path):
        data = real(self, file_path)
        if data is not None:  # (botocore also asks for optional files that do not exist)
            loaded.append(os.path.basename(file_path))
        return data

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", load_file)
    return loaded


def _resolved(session, region, options):
    """What a client of `session` resolves for `region`: endpoint, partition, signing, model, a presigned
    URL's path; or the error botocore raises for that combination (FIPS where a partition has none, say)."""
    try:
        client = _client(session, region, **options)
        request = {"Bucket": "b", "Key": "k/ü x"}
        return (client.meta.endpoint_url, client.meta.partition, client.meta.config.signature_version,
                client.meta.service_model.operation_names,
                client.generate_presigned_url("get_object", Params=request).split("?")[0])
    except botocore.exceptions.BotoCoreError as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("options", [{}, {"use_fips_endpoint": True}, {"use_dualstack_endpoint": True},
                                     {"s3": {"addressing_style": "path"}}])
def test_clients_resolve_every_partition_as_botocores_own(tmp_path, options):
    """The trimmed endpoints table changes nothing for S3: same answers, cold and warm, errors included."""
    for region in REGIONS:
        plain = _resolved(botocore.session.get_session(), region, options)
        assert _resolved(botomodels.session(str(tmp_path), "s3"), region, options) == plain, (region, "cold")
        assert _resolved(botomodels.session(str(tmp_path), "s3"), region, options) == plain, (region, "warm")


def test_a_second_session_parses_no_json(tmp_path, monkeypatch):
    loaded = _json_loads(monkeypatch)
    _client(botomodels.session(str(tmp_path), "s3"), "us-east-1")
    assert "endpoints" in loaded and "service-2" in loaded
    loaded.clear()
    _client(botomodels.session(str(tmp_path), "s3"), "us-east-1")
    assert loaded == []


def test_the_cache_is_private_and_versioned(tmp_path):
    _client(botomodels.session(str(tmp_path / "models"), "s3"), "us-east-1")
    (directory,) = (tmp_path / "models").iterdir()
    assert directory.name == f"botocore-{botocore.__version__}-boto3-{boto3.__version__}"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert files and all(f.suffix == ".marshal" and stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


@pytest.mark.parametrize("damage", [b"", b"\x00garbage", b"\xe3\x02\x00\x00\x00"])
def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(tmp_path, monkeypatch, damage):
    _client(botomodels.session(str(tmp_path), "s3"), "us-east-1")
    files = list(next(tmp_path.iterdir()).iterdir())
    for path in files:
        path.write_bytes(damage)
    loaded = _json_loads(monkeypatch)
    client = _client(botomodels.session(str(tmp_path), "s3"), "eu-west-1")
    assert client.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert "endpoints" in loaded
    loaded.clear()
    _client(botomodels.session(str(tmp_path), "s3"), "eu-west-1")
    assert loaded == []  # rewritten whole


@pytest.mark.parametrize("what", ["directory", "file"])
def test_a_cache_others_can_write_is_not_read(tmp_path, monkeypatch, what):
    _client(botomodels.session(str(tmp_path), "s3"), "us-east-1")
    directory = next(tmp_path.iterdir())
    for path in [directory] if what == "directory" else list(directory.iterdir()):
        path.chmod(0o777 if what == "directory" else 0o666)
    loaded = _json_loads(monkeypatch)
    client = _client(botomodels.session(str(tmp_path), "s3"), "us-east-1")
    assert client.meta.endpoint_url == "https://s3.amazonaws.com"
    assert "endpoints" in loaded and "service-2" in loaded


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    loaded = _json_loads(monkeypatch)
    client = _client(botomodels.session(str(blocker / "models"), "s3"), "us-east-1")
    assert client.meta.endpoint_url == "https://s3.amazonaws.com"
    assert "endpoints" in loaded


def test_no_directory_is_botocores_own_loader():
    session = botomodels.session("", "s3")
    assert type(session.get_component("data_loader")) is botocore.loaders.Loader
