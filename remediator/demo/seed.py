"""The demo GitOps repository: seeding, image releases and image rendering.

`remediator demo` and the tests call `seed_repository` to create a local bare
repository holding one application at `apps/<app>/` in one of three layouts,
the shapes of the public Argo CD example applications:

- `plain`: `deployment.yaml` with a Deployment and, in a second document, its
  Service. The image is `containers[0].image`.
- `kustomize`: `deployment.yaml` and `service.yaml` as resources of
  `kustomization.yaml`, whose `images:` entry pins the tag with `newTag`.
- `helm`: a chart whose `templates/deployment.yaml` builds the image from
  `.Values.image.repository` and `.Values.image.tag` in `values.yaml`.

`push_image` plays the release pipeline: it commits a change of the image
alone to the target branch. `render_image` computes the image a layout deploys,
which the Argo CD stand-in reports as the live image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import git
import yaml

from activities.gitops.repository import read_tree_files, resolve_commit, write_commit
from activities.gitops.yaml_edit import image_scalars, set_scalars

LAYOUTS = ("plain", "kustomize", "helm")
DEFAULT_BRANCH = "main"
DEMO_AUTHOR_NAME = "Demo release pipeline"
DEMO_AUTHOR_EMAIL = "release@demo.localhost"

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_CONTAINER_IMAGE = re.compile(
    r"^\d+\.spec\.template\.spec\.(?:initContainers|containers)\.\d+\.image$"
)
# Placeholder written into the templates below and then replaced with
# set_scalars, so each value gets the quoting that keeps it a string.
_PLACEHOLDER = "remediator-placeholder"


@dataclass(frozen=True)
class SeedResult:
    """Location, layout and first image of a seeded demo application."""

    bare_path: Path
    branch: str
    app_path: str
    layout: str
    namespace: str
    app: str
    image: str
    commit: str

    @property
    def repo_url(self) -> str:
        """The repository URL to give Argo CD and Remediator (a local path)."""
        return str(self.bare_path)


def split_image(reference: str) -> tuple[str, str, str]:
    """Split an image reference into (name, tag, digest), empty when absent.

    The digest follows `@`, and the tag follows the last `:` after the last
    `/`, so a registry port (`localhost:5000/app`) is not taken for a tag.
    """
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest
    return name, "", digest


def join_image(name: str, tag: str, digest: str) -> str:
    """Build an image reference from its parts; the inverse of split_image."""
    reference = name
    if tag:
        reference += f":{tag}"
    if digest:
        reference += f"@{digest}"
    return reference


# --- templates --------------------------------------------------------------

_DEPLOYMENT = """\
# {app}: the demo service that Remediator watches.
# Argo CD syncs this directory from the main branch.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {app}
  namespace: {namespace}
  labels:
    app.kubernetes.io/name: {app}
spec:
  replicas: 2
  revisionHistoryLimit: 3
  selector:
    matchLabels:
      app.kubernetes.io/name: {app}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {app}
    spec:
      containers:
        - name: {app}
          # The release pipeline bumps this tag on every release.
          image: {placeholder}
          ports:
            - name: http
              containerPort: 8080
          readinessProbe:
            httpGet:
              path: /healthz
              port: http
"""

_SERVICE = """\
# Cluster-internal entry point of {app}.
apiVersion: v1
kind: Service
metadata:
  name: {app}
  namespace: {namespace}
spec:
  selector:
    app.kubernetes.io/name: {app}
  ports:
    - name: http
      port: 80
      targetPort: http
"""

_KUSTOMIZATION = """\
# Kustomize entry point of {app}; Argo CD renders it with `kustomize build`.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

resources:
  - deployment.yaml
  - service.yaml

# The base names the repository only; the release pipeline pins the tag here.
images:
  - name: {placeholder}
    newTag: {placeholder}
"""

_CHART = """\
apiVersion: v2
name: {app}
description: The demo service that Remediator watches, as a Helm chart.
type: application
# Version of the chart itself, not of the application.
version: 0.1.0
"""

_VALUES = """\
# Default values of the {app} chart.
# Argo CD renders the chart with these values.

replicaCount: 2

image:
  # Registry and repository of the service image.
  repository: {placeholder}
  # Release tag, bumped by the release pipeline. Quote numeric tags ("1.10").
  tag: {placeholder}
  pullPolicy: IfNotPresent

service:
  type: ClusterIP
  port: 80
"""

_HELM_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
  labels:
    app.kubernetes.io/name: {{ .Chart.Name }}
    app.kubernetes.io/instance: {{ .Release.Name }}
spec:
  replicas: {{ .Values.replicaCount }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ .Release.Name }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {{ .Chart.Name }}
        app.kubernetes.io/instance: {{ .Release.Name }}
    spec:
      containers:
        - name: {{ .Chart.Name }}
          image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - name: http
              containerPort: 8080
"""

_HELM_SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}
spec:
  type: {{ .Values.service.type }}
  selector:
    app.kubernetes.io/instance: {{ .Release.Name }}
  ports:
    - name: http
      port: {{ .Values.service.port }}
      targetPort: http
"""


def _fill(template: str, values: dict[str, str], **names: str) -> str:
    """Format a template, then write `values` (location to value) with set_scalars."""
    text = template.format(placeholder=_PLACEHOLDER, **names)
    return set_scalars(text, values)


def _layout_files(layout: str, namespace: str, app: str, image: str) -> dict[str, str]:
    """Return the files of a layout, keyed by path relative to the app directory."""
    name, tag, digest = split_image(image)
    container = "0.spec.template.spec.containers.0.image"
    if layout == "plain":
        deployment = _fill(
            _DEPLOYMENT, {container: image}, app=app, namespace=namespace
        )
        service = _SERVICE.format(app=app, namespace=namespace)
        return {"deployment.yaml": f"{deployment}---\n{service}"}

    if not tag or digest:
        raise ValueError(
            f"invalid image {image!r} for layout {layout}: expected repository:tag "
            "without a digest"
        )
    if layout == "kustomize":
        return {
            "kustomization.yaml": _fill(
                _KUSTOMIZATION,
                {"0.images.0.name": name, "0.images.0.newTag": tag},
                app=app,
            ),
            "deployment.yaml": _fill(
                _DEPLOYMENT, {container: name}, app=app, namespace=namespace
            ),
            "service.yaml": _SERVICE.format(app=app, namespace=namespace),
        }
    if layout == "helm":
        return {
            "Chart.yaml": _CHART.format(app=app),
            "values.yaml": _fill(
                _VALUES, {"0.image.repository": name, "0.image.tag": tag}, app=app
            ),
            "templates/deployment.yaml": _HELM_DEPLOYMENT,
            "templates/service.yaml": _HELM_SERVICE,
        }
    raise ValueError(f"invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


# --- seeding and releases -----------------------------------------------------


def _check_names(layout: str, namespace: str, app: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}"
        )
    for label, value in (("namespace", namespace), ("app", app)):
        if not _NAME.match(value):
            raise ValueError(
                f"invalid {label} {value!r}: expected a DNS label (a-z, 0-9, -)"
            )


def seed_repository(
    bare_path: Path,
    layout: str,
    namespace: str,
    app: str,
    good_image: str,
    *,
    branch: str = DEFAULT_BRANCH,
) -> SeedResult:
    """Create a bare repository whose `branch` deploys `good_image` at `apps/<app>/`.

    Raises FileExistsError when `bare_path` exists and is not empty, and
    ValueError for an invalid layout, name or image.
    """
    _check_names(layout, namespace, app)
    bare_path = Path(bare_path).resolve()
    if bare_path.exists() and any(bare_path.iterdir()):
        raise FileExistsError(f"{bare_path} exists and is not empty; choose a new path")
    app_path = f"apps/{app}"
    files = _layout_files(layout, namespace, app, good_image)

    repo = git.Repo.init(bare_path, bare=True, initial_branch=branch)
    commit = write_commit(
        repo,
        None,
        {f"{app_path}/{name}": text.encode("utf-8") for name, text in files.items()},
        f"Add {app} ({layout} layout) deploying {good_image}\n",
        author_name=DEMO_AUTHOR_NAME,
        author_email=DEMO_AUTHOR_EMAIL,
    )
    repo.git.update_ref(f"refs/heads/{branch}", commit, "0" * 40)
    return SeedResult(
        bare_path=bare_path,
        branch=branch,
        app_path=app_path,
        layout=layout,
        namespace=namespace,
        app=app,
        image=good_image,
        commit=commit,
    )


def _image_edit(
    layout: str, files: dict[str, str], image: str
) -> tuple[str, dict[str, str]]:
    """Return (file, location changes) that make a layout deploy `image`."""
    name, tag, digest = split_image(image)
    if layout == "plain":
        for file, locations in _container_images(files).items():
            return file, {locations[0]: image}
        raise ValueError("no container image found in the plain layout")
    if not tag or digest:
        raise ValueError(
            f"invalid image {image!r}: expected repository:tag without a digest"
        )

    if layout == "kustomize":
        scalars = image_scalars(files["kustomization.yaml"])
        for location, value in scalars.items():
            parts = location.split(".")
            if parts[-1] == "name" and value == name:
                entry = ".".join(parts[:-1])
                if f"{entry}.newTag" not in scalars:
                    raise ValueError(f"images entry {entry} has no newTag to change")
                return "kustomization.yaml", {f"{entry}.newTag": tag}
        raise ValueError(f"no images entry named {name!r} in kustomization.yaml")

    if layout == "helm":
        scalars = image_scalars(files["values.yaml"])
        changes = {"0.image.tag": tag}
        if scalars.get("0.image.repository") != name:
            changes["0.image.repository"] = name
        return "values.yaml", changes
    raise ValueError(f"invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


def push_image(
    bare_path: Path, layout: str, app: str, image: str, *, branch: str = DEFAULT_BRANCH
) -> str:
    """Commit "Deploy <image>" to `branch`, changing only the image, and return its sha.

    The branch is moved with a compare-and-swap, so a concurrent push makes
    this call fail instead of losing the other commit.
    """
    repo = git.Repo(Path(bare_path))
    head = resolve_commit(repo, f"refs/heads/{branch}")
    if head is None:
        raise ValueError(f"branch {branch!r} not found in {bare_path}")
    app_path = f"apps/{app}"
    files = read_tree_files(repo, head, app_path)
    if not files:
        raise ValueError(f"no YAML files under {app_path} at {head}")
    file, changes = _image_edit(layout, files, image)
    edited = set_scalars(files[file], changes)
    commit = write_commit(
        repo,
        head,
        {str(PurePosixPath(app_path) / file): edited.encode("utf-8")},
        f"Deploy {image}\n",
        author_name=DEMO_AUTHOR_NAME,
        author_email=DEMO_AUTHOR_EMAIL,
    )
    repo.git.update_ref(f"refs/heads/{branch}", commit, head)
    return commit


# --- rendering ----------------------------------------------------------------


def _container_images(files: dict[str, str]) -> dict[str, list[str]]:
    """Map each YAML file to the locations of its container images, in order."""
    found: dict[str, list[str]] = {}
    for file in sorted(files):
        if not file.endswith((".yaml", ".yml")):
            continue
        locations = [
            location
            for location in image_scalars(files[file])
            if _CONTAINER_IMAGE.match(location)
        ]
        if locations:
            found[file] = locations
    return found


def _first_container_image(files: dict[str, str]) -> str:
    for file, locations in _container_images(files).items():
        return image_scalars(files[file])[locations[0]]
    raise ValueError("no container image found in the manifests")


def _apply_kustomize_images(base_image: str, kustomization: str) -> str:
    """Apply the `images:` entry named like the base image, as kustomize does."""
    name, tag, digest = split_image(base_image)
    entries: dict[str, dict[str, str]] = {}
    for location, value in image_scalars(kustomization).items():
        parts = location.split(".")
        if len(parts) == 4 and parts[1] == "images":
            entries.setdefault(parts[2], {})[parts[3]] = value
    for entry in entries.values():
        if entry.get("name") != name:
            continue
        new_name = entry.get("newName", name)
        new_tag = entry.get("newTag", tag)
        new_digest = entry.get("digest", digest)
        return join_image(new_name, new_tag, new_digest)
    return base_image


def render_image(files: dict[str, str], layout: str) -> str:
    """Return the image that the files of an application directory deploy.

    `files` maps paths relative to the application directory to their text.
    Raises ValueError (or yaml.YAMLError) when the files do not render.
    """
    if layout == "plain":
        return _first_container_image(files)

    if layout == "kustomize":
        kustomization = files.get("kustomization.yaml") or files.get(
            "kustomization.yml"
        )
        if kustomization is None:
            raise ValueError("kustomization.yaml not found")
        document = yaml.safe_load(kustomization) or {}
        resources = [str(r) for r in document.get("resources") or []]
        missing = [resource for resource in resources if resource not in files]
        if missing:
            raise ValueError(f"kustomization resources not found: {', '.join(missing)}")
        base_image = _first_container_image({r: files[r] for r in resources})
        return _apply_kustomize_images(base_image, kustomization)

    if layout == "helm":
        values = files.get("values.yaml")
        if values is None:
            raise ValueError("values.yaml not found")
        scalars = image_scalars(values)
        repository = scalars.get("0.image.repository")
        tag = scalars.get("0.image.tag")
        if not repository or not tag:
            raise ValueError("values.yaml needs image.repository and image.tag")
        # NOTE: real Helm reads an unquoted numeric tag as a number (`1.10`
        # renders as `1.1`); the source text is used here, as written.
        return f"{repository}:{tag}"

    raise ValueError(f"invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
