"""Tests of the byte-preserving image scalar reader and editor."""

from __future__ import annotations

import difflib

import pytest
import yaml

from activities.gitops.yaml_edit import image_scalars, resolves_as_string, set_scalars

HELM_VALUES = """\
# values.yaml of a chart whose tags look like numbers
image:
  repository: registry.example.test/team/api
  tag: 1.0   # trailing comment stays
  pullPolicy: IfNotPresent
initContainers:
  migrate:
    image:
      repository: registry.example.test/team/migrate
      tag: 14.10
sidecar:
  image:
    repository: registry.example.test/team/sidecar
    tag: 87940363
worker:
  image:
    repository: registry.example.test/team/worker
    tag: 0e1234
legacy:
  image:
    repository: registry.example.test/team/legacy
    tag: 0362525
quoted:
  image:
    repository: 'registry.example.test/team/quoted'
    tag: "1.0"
    digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
"""

CRLF_MULTIDOC = (
    "apiVersion: apps/v1\r\n"
    "kind: Deployment\r\n"
    "metadata:\r\n"
    "  name:  shop-web\r\n"
    "spec:\r\n"
    "  template:\r\n"
    "    spec:\r\n"
    "      containers:\r\n"
    "      - name:  shop-web\r\n"
    "        image:  nginx:1.25.3\r\n"
    "      - name: log-shipper   # second container\r\n"
    "        image: fluent/fluent-bit:3.0\r\n"
    "---\r\n"
    "apiVersion: v1\r\n"
    "kind: Service\r\n"
    "metadata:\r\n"
    "  name: shop-web\r\n"
    "spec:\r\n"
    "  ports:\r\n"
    "  - port: 80\r\n"
)

KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- deployment.yaml
images:
# tag and digest together: the digest wins at runtime
- name: example/app
  newTag: v1.4.0
  digest: sha256:24a0c4b4a4c0eb97a1aabb8e29f18e917d05abfe1b7a7c07857230879ce7d3d3
# tag smuggled into newTag with a digest
- name: example/other
  newTag: 2.2-date@sha256:7890
- name: example/renamed
  newName: mirror.example.test/example/renamed
  newTag: '0.2.0'
"""


def _changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), n=0
    )
    return [
        line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


# --- reading ---


def test_numeric_looking_tags_read_as_written():
    scalars = image_scalars(HELM_VALUES)
    assert scalars["0.image.tag"] == "1.0"
    assert scalars["0.initContainers.migrate.image.tag"] == "14.10"
    assert scalars["0.sidecar.image.tag"] == "87940363"
    assert scalars["0.worker.image.tag"] == "0e1234"
    assert scalars["0.legacy.image.tag"] == "0362525"
    assert scalars["0.quoted.image.tag"] == "1.0"


def test_helm_mapping_keys_are_image_related():
    scalars = image_scalars(HELM_VALUES)
    assert scalars["0.image.repository"] == "registry.example.test/team/api"
    assert scalars["0.quoted.image.repository"] == "registry.example.test/team/quoted"
    assert scalars["0.quoted.image.digest"].startswith("sha256:0123")
    assert "0.image.pullPolicy" not in scalars


def test_container_images_in_every_document():
    scalars = image_scalars(CRLF_MULTIDOC)
    assert scalars == {
        "0.spec.template.spec.containers.0.image": "nginx:1.25.3",
        "0.spec.template.spec.containers.1.image": "fluent/fluent-bit:3.0",
    }


def test_kustomize_images_entries():
    scalars = image_scalars(KUSTOMIZATION)
    assert scalars["0.images.0.name"] == "example/app"
    assert scalars["0.images.0.newTag"] == "v1.4.0"
    assert scalars["0.images.0.digest"].endswith("ce7d3d3")
    assert scalars["0.images.1.newTag"] == "2.2-date@sha256:7890"
    assert scalars["0.images.2.newName"] == "mirror.example.test/example/renamed"
    assert scalars["0.images.2.newTag"] == "0.2.0"
    assert "0.resources.0" not in scalars


def test_images_list_below_top_level_is_ignored():
    text = "spec:\n  images:\n  - name: not-kustomize\n    newTag: v1\n"
    assert image_scalars(text) == {}


def test_null_and_non_image_values_left_out():
    text = "image:\n  repository: example/app\n  tag:\n  pullPolicy: Always\nname: x\n"
    assert image_scalars(text) == {"0.image.repository": "example/app"}


def test_invalid_yaml_raises():
    with pytest.raises(yaml.YAMLError):
        image_scalars("image: [unclosed\n")


# --- writing ---


@pytest.mark.parametrize(
    "tag", ["1.0", "14.10", "87940363", "0e1234", "0362525", "1e3", "true"]
)
def test_numeric_tag_written_quoted(tag):
    text = "image:\n  repository: example/app\n  tag: v2\n"
    edited = set_scalars(text, {"0.image.tag": tag})
    assert edited == f'image:\n  repository: example/app\n  tag: "{tag}"\n'
    assert yaml.safe_load(edited)["image"]["tag"] == tag
    assert image_scalars(edited)["0.image.tag"] == tag


@pytest.mark.parametrize(
    "value",
    ["1.10", "0362525", "87940363", "0e1234", "true", "null", "yes", "y", "~", "1:20"],
)
def test_non_string_plain_values_detected(value):
    assert not resolves_as_string(value)


@pytest.mark.parametrize(
    "value", ["v1.2.3", "nginx:1.25.4", "2.0.0", "sha256:abc", "1.0-rc1"]
)
def test_string_plain_values_detected(value):
    assert resolves_as_string(value)


def test_plain_string_tag_stays_plain():
    text = "image:\n  tag: 1.0   # trailing comment stays\n"
    edited = set_scalars(text, {"0.image.tag": "v1.1.0"})
    assert edited == "image:\n  tag: v1.1.0   # trailing comment stays\n"


def test_quote_style_kept():
    edited = set_scalars(
        HELM_VALUES,
        {"0.quoted.image.tag": "2.0", "0.quoted.image.repository": "it's/odd"},
    )
    assert '    tag: "2.0"\n' in edited
    assert "    repository: 'it''s/odd'\n" in edited
    assert yaml.safe_load(edited)["quoted"]["image"]["repository"] == "it's/odd"


def test_helm_values_edit_changes_one_line():
    edited = set_scalars(HELM_VALUES, {"0.legacy.image.tag": "0362526"})
    assert _changed_lines(HELM_VALUES, edited) == [
        "-    tag: 0362525\n",
        '+    tag: "0362526"\n',
    ]
    assert "# values.yaml of a chart whose tags look like numbers\n" in edited
    assert "# trailing comment stays" in edited


def test_crlf_multidoc_byte_identical_except_value():
    location = "0.spec.template.spec.containers.0.image"
    edited = set_scalars(CRLF_MULTIDOC, {location: "nginx:1.25.4"})
    assert edited == CRLF_MULTIDOC.replace(
        "image:  nginx:1.25.3", "image:  nginx:1.25.4"
    )
    assert edited.count("\r\n") == CRLF_MULTIDOC.count("\r\n")
    assert "\n" not in edited.replace("\r\n", "")
    assert image_scalars(edited)[location] == "nginx:1.25.4"


def test_second_document_edit():
    text = (
        "kind: Service\n---\n# keep\nkind: Pod\nspec:\n  containers:\n  - image: a:1\n"
    )
    edited = set_scalars(text, {"1.spec.containers.0.image": "a:2"})
    assert edited == text.replace("a:1", "a:2")


def test_byte_order_mark_kept():
    text = "\ufeffimage: app:1\n"
    assert set_scalars(text, {"0.image": "app:2"}) == "\ufeffimage: app:2\n"


def test_kustomize_tag_and_digest_edit():
    edited = set_scalars(
        KUSTOMIZATION,
        {
            "0.images.0.newTag": "v1.3.0",
            "0.images.0.digest": "sha256:" + "a" * 64,
        },
    )
    changed = _changed_lines(KUSTOMIZATION, edited)
    assert changed == [
        "-  newTag: v1.4.0\n",
        "-  digest: sha256:24a0c4b4a4c0eb97a1aabb8e29f18e917d05abfe1b7a7c07857230879"
        "ce7d3d3\n",
        "+  newTag: v1.3.0\n",
        "+  digest: sha256:" + "a" * 64 + "\n",
    ]
    assert "# tag and digest together: the digest wins at runtime\n" in edited
    assert image_scalars(edited)["0.images.1.newTag"] == "2.2-date@sha256:7890"


def test_flow_mapping_value_quoted_when_needed():
    text = "image: {repository: example/app, tag: v1}\n"
    assert set_scalars(text, {"0.image.tag": "v2"}) == (
        "image: {repository: example/app, tag: v2}\n"
    )
    assert set_scalars(text, {"0.image.tag": "1.10"}) == (
        'image: {repository: example/app, tag: "1.10"}\n'
    )


def test_unknown_location_raises():
    with pytest.raises(ValueError, match="0.image.nope not found"):
        set_scalars("image:\n  tag: v1\n", {"0.image.nope": "v2"})


def test_empty_value_raises():
    with pytest.raises(ValueError, match="0.image.tag has an empty value"):
        set_scalars("image:\n  tag:\n", {"0.image.tag": "v2"})


def test_block_scalar_raises():
    with pytest.raises(ValueError, match="block scalar"):
        set_scalars("image: |\n  app:1\n", {"0.image": "app:2"})


def test_duplicate_key_raises():
    with pytest.raises(ValueError, match="occurs more than once"):
        set_scalars("image: a:1\nimage: a:2\n", {"0.image": "a:3"})


def test_no_changes_returns_text():
    assert set_scalars(CRLF_MULTIDOC, {}) is CRLF_MULTIDOC
