"""API keys from a mounted file follow the file with no restart: a rotated key works and a revoked one is refused
within keys_reload_interval_s, through the same AccessControl (one Ingress replica's). The file is laid out as a
Kubernetes Secret volume does it (`api_keys.yaml -> ..data/api_keys.yaml`, `..data -> ..<timestamp>`, updated by
swapping the `..data` symlink), and also rewritten in place."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from deployments.access import AccessConfigError, AccessControl
from deployments.errors import Unauthorized
from instantid_app.settings import AccessConfig

OLD, NEW = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
INTERVAL_S = 0.2


class SecretVolume:
    """A folder shaped like a mounted Kubernetes Secret, updated the way the kubelet updates one."""

    def __init__(self, root: Path) -> None:
        self.root, self.version = root, 0
        (root / "api_keys.yaml").symlink_to("..data/api_keys.yaml")

    def publish(self, text: str) -> None:
        self.version += 1
        folder = self.root / f"..2026_{self.version}"
        folder.mkdir()
        (folder / "api_keys.yaml").write_text(text)
        (self.root / "..data_tmp").symlink_to(folder.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")  # atomic, as the kubelet does

    @property
    def path(self) -> Path:
        return self.root / "api_keys.yaml"


def keys(*pairs: tuple[str, str]) -> str:
    return yaml.safe_dump({"keys": [{"name": name, "key": key} for name, key in pairs]})


def allowed(access: AccessControl, key: str) -> bool:
    try:
        access.check(f"Bearer {key}", None, "generate")
        return True
    except Unauthorized:
        return False


def within_interval(condition) -> bool:
    deadline = time.monotonic() + 5 * INTERVAL_S + 1
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(INTERVAL_S / 4)
    return False


def test_a_rotated_key_works_and_a_revoked_one_is_refused_without_a_restart(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish(keys(("app", OLD)))
    access = AccessControl(AccessConfig(api_keys_file=str(volume.path), keys_reload_interval_s=INTERVAL_S))
    assert allowed(access, OLD) and not allowed(access, NEW)
    volume.publish(keys(("app", OLD), ("app-next", NEW)))  # rotation, step 1: both keys
    assert within_interval(lambda: allowed(access, NEW))
    assert allowed(access, OLD)
    volume.publish(keys(("app-next", NEW)))  # step 2: the old key revoked
    assert within_interval(lambda: not allowed(access, OLD))
    assert allowed(access, NEW)


def test_a_file_rewritten_in_place_is_followed_too(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys(("app", OLD)))
    access = AccessControl(AccessConfig(api_keys_file=str(path), keys_reload_interval_s=INTERVAL_S))
    path.write_text(keys(("app", NEW)))  # same name, same length, new key
    assert within_interval(lambda: allowed(access, NEW) and not allowed(access, OLD))


def test_a_broken_or_missing_file_keeps_the_previous_keys_until_a_good_one_arrives(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path)
    volume.publish(keys(("app", OLD)))
    access = AccessControl(AccessConfig(api_keys_file=str(volume.path), keys_reload_interval_s=INTERVAL_S))
    volume.publish("keys: [{name: app, key: short}")  # cut off mid-write
    time.sleep(3 * INTERVAL_S)
    assert allowed(access, OLD)  # not everyone refused
    (tmp_path / "..data").unlink()
    time.sleep(3 * INTERVAL_S)
    assert allowed(access, OLD)
    volume.publish(keys(("app", NEW)))
    assert within_interval(lambda: allowed(access, NEW) and not allowed(access, OLD))


def test_a_bad_file_at_start_still_fails_the_deploy(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys: []")
    with pytest.raises(AccessConfigError):
        AccessControl(AccessConfig(api_keys_file=str(path)))
