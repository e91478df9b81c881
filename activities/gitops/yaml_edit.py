"""Byte-preserving edits of image scalars in GitOps YAML files.

The GitOps activities, the local pull-request provider and the demo seeder call
this module to read the image references of a manifest, a Kustomize
`kustomization.yaml` or Helm values, and to write a rollback back into the same
text. An edit replaces only the characters of the scalars it changes, located
through the PyYAML composer's node marks. Comments, key order, line endings, a
byte order mark, irregular spacing, quoting and other documents stay as they
were.

A location is `"<document index>.<key path>"`, with sequence items as their
index: `0.spec.template.spec.containers.0.image`, `0.images.1.newTag`,
`0.image.tag`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"

# Keys of a Helm-style image mapping, recognised inside any mapping that has a
# `repository` or `tag` key. `registry` is the Bitnami charts' extra key.
HELM_IMAGE_KEYS = frozenset({"registry", "repository", "tag", "digest"})
HELM_MARKER_KEYS = frozenset({"repository", "tag"})
# Keys of one entry of a Kustomization's top-level `images:` list.
KUSTOMIZE_IMAGE_KEYS = frozenset({"name", "newName", "newTag", "digest"})

# Plain scalars that the YAML 1.2 core schema resolves to something other than
# a string. Go's YAML libraries (Helm, Argo CD, kustomize) follow this schema
# closely, and PyYAML's YAML 1.1 resolver misses some of them, such as `0e1234`.
_YAML12_NON_STRING = re.compile(
    r"""^(?:
        [-+]?[0-9]+
      | 0o[0-7]+
      | 0x[0-9a-fA-F]+
      | [-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
      | [-+]?\.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN)
      | true|True|TRUE|false|False|FALSE
      | null|Null|NULL|~
    )$""",
    re.VERBOSE,
)
# Booleans of YAML 1.1 that PyYAML does not resolve but Go's yaml.v2 does.
_YAML11_EXTRA_BOOLEANS = frozenset({"y", "Y", "n", "N"})


@dataclass(frozen=True)
class _Scalar:
    """One scalar value of a YAML text, with its parent collection."""

    location: str
    parts: tuple[str, ...]
    node: ScalarNode
    parent: MappingNode | SequenceNode

    @property
    def parent_is_flow(self) -> bool:
        return bool(self.parent.flow_style)


def _compose_documents(text: str) -> list[Node | None]:
    return list(yaml.compose_all(text, Loader=yaml.SafeLoader))


def _walk(
    node: Node, parts: tuple[str, ...], seen: set[int]
) -> Iterator[tuple[tuple[str, ...], ScalarNode, MappingNode | SequenceNode]]:
    """Yield (path parts, scalar node, parent) for every scalar value below node."""
    # An alias reuses the anchored node object. Walking it again would loop on
    # a recursive anchor, so each collection is entered once.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        children = [
            (key.value, value)
            for key, value in node.value
            if isinstance(key, ScalarNode)
        ]
    elif isinstance(node, SequenceNode):
        children = [(str(index), item) for index, item in enumerate(node.value)]
    else:
        return
    for name, child in children:
        if isinstance(child, ScalarNode):
            yield (*parts, name), child, node
        else:
            yield from _walk(child, (*parts, name), seen)


# Texts up to this many characters keep their parsed scalars in a cache, so the
# same file read by find_change and then edited by the pull request is composed
# once per process.
_CACHED_TEXT_MAX_CHARS = 1 << 20


def _scalars(text: str) -> tuple[dict[str, _Scalar], frozenset[str]]:
    """Index every scalar value of every document by its location.

    Returns the index and the locations that occur more than once (duplicated
    keys). The index keeps the last occurrence, as YAML loaders do. Results
    may be shared between callers, so callers must not modify them.
    """
    if len(text) <= _CACHED_TEXT_MAX_CHARS:
        return _cached_scalars(text)
    return _compose_scalars(text)


@functools.lru_cache(maxsize=64)
def _cached_scalars(text: str) -> tuple[dict[str, _Scalar], frozenset[str]]:
    return _compose_scalars(text)


def _compose_scalars(text: str) -> tuple[dict[str, _Scalar], frozenset[str]]:
    scalars: dict[str, _Scalar] = {}
    duplicates: set[str] = set()
    for doc_index, root in enumerate(_compose_documents(text)):
        if root is None:
            continue
        for parts, node, parent in _walk(root, (str(doc_index),), set()):
            location = ".".join(parts)
            if location in scalars:
                duplicates.add(location)
            scalars[location] = _Scalar(location, parts, node, parent)
    return scalars, frozenset(duplicates)


def _is_image_scalar(scalar: _Scalar) -> bool:
    """Decide whether a scalar is part of an image reference."""
    key = scalar.parts[-1]
    if key == "image" and isinstance(scalar.parent, MappingNode):
        return True
    if isinstance(scalar.parent, MappingNode) and key in HELM_IMAGE_KEYS:
        parent_keys = {
            k.value for k, _ in scalar.parent.value if isinstance(k, ScalarNode)
        }
        if parent_keys & HELM_MARKER_KEYS:
            return True
    # `<doc>.images.<n>.<key>`: an entry of a top-level Kustomize images list.
    return (
        len(scalar.parts) == 4
        and scalar.parts[1] == "images"
        and scalar.parts[2].isdigit()
        and key in KUSTOMIZE_IMAGE_KEYS
    )


def _is_null(node: ScalarNode) -> bool:
    return node.style is None and node.tag == NULL_TAG


def image_scalars(text: str) -> dict[str, str]:
    """Return every image-related string scalar of `text`, keyed by location.

    Three kinds of scalar are image-related:

    - the scalar value of an `image` key,
    - the `registry`, `repository`, `tag` and `digest` values of a mapping
      that has a `repository` or `tag` key (Helm values),
    - the `name`, `newName`, `newTag` and `digest` values of the entries of a
      top-level `images:` list (Kustomize).

    Each value is the scalar's source text after unquoting, so
    `0362525`, `1.10` and `0e1234` come back exactly as written. Plain null
    values (`tag:` or `tag: ~`) are left out because they name no image.

    Raises yaml.YAMLError when the text is not valid YAML.
    """
    result: dict[str, str] = {}
    scalars, _ = _scalars(text)
    for location, scalar in scalars.items():
        if _is_null(scalar.node):
            continue
        if _is_image_scalar(scalar):
            result[location] = scalar.node.value
    return result


@functools.lru_cache(maxsize=1024)
def resolves_as_string(value: str) -> bool:
    """Tell whether `value` written as a plain scalar reads back as this string.

    The check covers PyYAML's YAML 1.1 resolver (octal `0362525`, sexagesimal
    `1:20`, `yes`, timestamps), the YAML 1.2 core schema (`0e1234`, `0o17`)
    and the `y`/`n` booleans of Go's yaml.v2. It also rejects any text that is
    not a valid plain scalar in both block and flow context.
    """
    if not value or value != value.strip() or "\n" in value or "\r" in value:
        return False
    if _YAML12_NON_STRING.match(value) or value in _YAML11_EXTRA_BOOLEANS:
        return False
    for sample in (f"k: {value}\n", f"{{k: {value}}}\n"):
        try:
            root = yaml.compose(sample, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return False
        if not isinstance(root, MappingNode) or len(root.value) != 1:
            return False
        node = root.value[0][1]
        if not isinstance(node, ScalarNode):
            return False
        if node.style is not None or node.tag != STR_TAG or node.value != value:
            return False
    return True


def _double_quoted(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar with the same value.
    return json.dumps(value, ensure_ascii=False)


def _single_quoted(value: str) -> str | None:
    if any(ch in value for ch in "\n\r\t") or not value.isprintable():
        return None
    return "'" + value.replace("'", "''") + "'"


def _render(scalar: _Scalar, value: str) -> str:
    """Write `value` in the quote style of the scalar it replaces."""
    style = scalar.node.style
    if style == '"':
        return _double_quoted(value)
    if style == "'":
        return _single_quoted(value) or _double_quoted(value)
    if style is None:
        if resolves_as_string(value) and (
            not scalar.parent_is_flow or not any(c in value for c in ",[]{}")
        ):
            return value
        return _double_quoted(value)
    raise ValueError(
        f"YAML location {scalar.location} is a block scalar ({style}), "
        "but only plain and quoted scalars can be edited"
    )


def set_scalars(text: str, changes: dict[str, str]) -> str:
    """Return `text` with the scalars at the given locations replaced.

    Only the characters of each changed scalar differ from the input. A
    quoted scalar keeps its quote style. A plain scalar stays plain unless
    `resolves_as_string` rejects the new value, as it does for `1.10`,
    `0362525` and `0e1234`. Such a value is written double-quoted.

    Raises ValueError naming the location when a location is not a scalar of
    the text, is a plain null (no characters to replace) or is a block scalar.
    """
    if not changes:
        return text
    scalars, duplicates = _scalars(text)
    replacements: dict[tuple[int, int], tuple[str, str]] = {}
    for location, value in changes.items():
        if location in duplicates:
            raise ValueError(
                f"YAML location {location} occurs more than once (duplicated key). "
                "Remove the duplicate before editing"
            )
        scalar = scalars.get(location)
        if scalar is None:
            raise ValueError(
                f"YAML location {location} not found. "
                f"Expected one of: {', '.join(sorted(scalars)) or 'none'}"
            )
        start = scalar.node.start_mark.index
        end = scalar.node.end_mark.index
        if start == end:
            raise ValueError(
                f"YAML location {location} has an empty value, so there is "
                "no text to replace. Write a placeholder value first"
            )
        rendered = _render(scalar, value)
        span = (start, end)
        previous = replacements.get(span)
        if previous is not None and previous[1] != rendered:
            raise ValueError(
                f"YAML locations {previous[0]} and {location} are the same node "
                "(an anchor and its alias) but were given different values"
            )
        replacements[span] = (location, rendered)

    pieces: list[str] = []
    cursor = 0
    for (start, end), (_, rendered) in sorted(replacements.items()):
        pieces.append(text[cursor:start])
        pieces.append(rendered)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)
