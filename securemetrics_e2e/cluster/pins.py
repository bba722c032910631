"""Third-party artifacts the cluster backend installs, pinned by digest.

* kind node images: those the kind release in :mod:`.tools` lists as built for it,
  pinned by image digest as kind's release notes require.
* Gateway API CRDs: the ``config/crd/standard`` files at each release tag (what
  ``kubectl kustomize github.com/kubernetes-sigs/gateway-api/config/crd?ref=<tag>``
  reads), fetched from raw.githubusercontent.com at that tag. Each sha256 was computed
  from the file's git blob at the tag.
* Prometheus Operator: the release asset ``bundle.yaml`` (CRDs + operator). Its sha256 is
  that of ``bundle.yaml`` at the release tag, which the project's release workflow
  uploads unchanged; it was checked by regenerating the file from the tag's sources with
  the project's own ``scripts/generate-bundle.sh`` and comparing the git blob id.
"""

from __future__ import annotations

from securemetrics_e2e.cluster.errors import DownloadFailed
from securemetrics_e2e.cluster.tools import PinnedFile
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import KubernetesRange

#: kind v0.33.0 release notes, "Images pre-built for this release" (amd64 and arm64)
_KIND_IMAGE_DIGESTS = {
    "v1.37.0": "a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5",
    "v1.36.4": "099e049362a1526b2db71494e1947aae99bd16290d7c895f2b7ea312e3cbfaed",
    "v1.35.8": "07b2536e30b803ed61d1677a79df6115f798ce64c80f9e22f6ed45afd09323c0",
    "v1.34.11": "44e222ee2132dab25ff87301682f89eb82c7880ea3a1bf543bfe9708fd08d67d",
}
#: Kubernetes minor -> node image pinned by digest
KIND_NODE_IMAGES: dict[str, str] = {
    tag[1:].rsplit(".", 1)[0]: f"kindest/node:{tag}@sha256:{digest}"
    for tag, digest in _KIND_IMAGE_DIGESTS.items()
}


def node_image(kubernetes: KubernetesRange) -> str:
    """The newest pinned node image whose Kubernetes minor the Istio version supports."""
    fitting = [minor for minor in kubernetes.minors() if minor in KIND_NODE_IMAGES]
    if not fitting:
        raise UsageError(
            f"no kind node image pinned for Kubernetes {kubernetes}; pinned: "
            f"{', '.join(sorted(KIND_NODE_IMAGES))}. Pass --kind-image with an image built "
            "for the pinned kind release"
        )
    return KIND_NODE_IMAGES[max(fitting, key=lambda m: tuple(int(p) for p in m.split(".")))]


_GATEWAY_API_RAW = (
    "https://raw.githubusercontent.com/kubernetes-sigs/gateway-api/{tag}/config/crd/{path}"
)

# file -> sha256 of the file at the tag (config/crd/kustomization.yaml order)
_GATEWAY_API_FILES: dict[str, list[tuple[str, str]]] = {
    "v1.4.1": [
        (
            "standard/gateway.networking.k8s.io_gatewayclasses.yaml",
            "7d958ad3965ea4a4996616846d9ecaf1fededbf9351b9752b8b85973936ae8c8",
        ),
        (
            "standard/gateway.networking.k8s.io_gateways.yaml",
            "a02ea425fc901f197b668c9ddd56375e1f6896994914c6e6b9b4fdb85cf3ba6e",
        ),
        (
            "standard/gateway.networking.k8s.io_grpcroutes.yaml",
            "b72068b42cb32051ca609e5a8dfefb16904d164abe2e71d9f3c776fae41c4dab",
        ),
        (
            "standard/gateway.networking.k8s.io_httproutes.yaml",
            "98c6777c22309d319292e9c288ee632006c9ffdd4272383d6f9dffa3fbccaf14",
        ),
        (
            "standard/gateway.networking.k8s.io_referencegrants.yaml",
            "d74fc2f8e90094f4c4d6dc13a2d720011a40e30e5640b3e2a2051fac820f6584",
        ),
        (
            "standard/gateway.networking.k8s.io_backendtlspolicies.yaml",
            "f94f34b0c19cab6c25b53a6e672d9a684116a4e52193531fe2abcea20b51574f",
        ),
    ],
    "v1.5.1": [
        (
            "standard/gateway.networking.k8s.io_gatewayclasses.yaml",
            "234ad4b2757ee1b3596a4187bb98df071c5bbdd9e1806f692f2dbf8387e6bef4",
        ),
        (
            "standard/gateway.networking.k8s.io_gateways.yaml",
            "7416e8300eb4d8c0a71a23445609075bbacbe8bc80104584b019cfe1ebe77c31",
        ),
        (
            "standard/gateway.networking.k8s.io_grpcroutes.yaml",
            "979f4125d44d3df24659ba00d1d04ff8e76c45423193e8aae82dd5810d7827df",
        ),
        (
            "standard/gateway.networking.k8s.io_httproutes.yaml",
            "682203b109baecb18d38073a578f7bc2c17d22fe9b0c27bf030850abe014c370",
        ),
        (
            "standard/gateway.networking.k8s.io_referencegrants.yaml",
            "a8902c486eed0b7339f5bb8a476ccaba0918eb038048402bdc01cbb69b0fbb51",
        ),
        (
            "standard/gateway.networking.k8s.io_backendtlspolicies.yaml",
            "9b8818172153d72f9c84032db0be0a4a657277d13f5bbc22226ad9481ff57971",
        ),
        (
            "standard/gateway.networking.k8s.io_listenersets.yaml",
            "9221468d19fdfbb0026113b1ef64abac64f27607975aff2410361b8b38f0e0bb",
        ),
        (
            "standard/gateway.networking.k8s.io_tlsroutes.yaml",
            "818e4827c469a40e2527a2851591e656782c50fea8dd44812c900d219da09345",
        ),
        (
            "standard/gateway.networking.k8s.io_vap_safeupgrades.yaml",
            "981a4da92706cb567c051e006ff229429947f054b90cd0719c297abe14f958a1",
        ),
    ],
    "v1.6.0": [
        (
            "standard/gateway.networking.k8s.io_gatewayclasses.yaml",
            "a09b320e69257056e34f268160f883e98d4da9b8786fff3463484ba5fda719df",
        ),
        (
            "standard/gateway.networking.k8s.io_gateways.yaml",
            "7dcaf56db92b197207bc149f049c1be0208bedc8608a56905900d3bfc71b8632",
        ),
        (
            "standard/gateway.networking.k8s.io_grpcroutes.yaml",
            "a97b717e425979726039c813f308f8ab9686e5478ee5072eec5f94ec61db3bf5",
        ),
        (
            "standard/gateway.networking.k8s.io_httproutes.yaml",
            "8c05f321e53b5df6aa4bdbf622a01db9c331f26d7b9723b0fc47001c1341858a",
        ),
        (
            "standard/gateway.networking.k8s.io_referencegrants.yaml",
            "37ab52cd8db78fb1fe14140aba96b64f6012a1fb6eb9b98daa321adb57b42f17",
        ),
        (
            "standard/gateway.networking.k8s.io_backendtlspolicies.yaml",
            "05dd20abea3eb1b5108b9a842a8482d5099db24bd9047bfd3965c7f27a047db7",
        ),
        (
            "standard/gateway.networking.k8s.io_listenersets.yaml",
            "2dc80892f2bf636bd678e504bca04f52856f21eef2202091ea842ef39b52339f",
        ),
        (
            "standard/gateway.networking.k8s.io_tcproutes.yaml",
            "a4659f3e1fd7cdd21c44757d9f0febef930dac4fe5f0430c857d5eb853d6e686",
        ),
        (
            "standard/gateway.networking.k8s.io_tlsroutes.yaml",
            "b3f7a900cb767b7be07fec6d277afe43a9b1db36053fef95beacccb1190fa6ca",
        ),
        (
            "standard/gateway.networking.k8s.io_udproutes.yaml",
            "33250d34719f05cd1791e5ea2f36d2c8323f6828c204643c53734df41d3d6e1b",
        ),
        (
            "standard/gateway.networking.k8s.io_vap_safeupgrades.yaml",
            "f3c4889dc8ad81a76b3c99b43462d492c8396de7c1387dbfb818edaf24841261",
        ),
    ],
}

#: the CRD whose presence (and bundle-version annotation) says Gateway API is installed
GATEWAY_CRD = "gateways.gateway.networking.k8s.io"
GATEWAY_BUNDLE_ANNOTATION = "gateway.networking.k8s.io/bundle-version"


def gateway_api_files(version: str) -> list[PinnedFile]:
    """The standard-channel CRD files of Gateway API ``version``, each with its sha256."""
    files = _GATEWAY_API_FILES.get(version)
    if files is None:
        raise DownloadFailed(
            f"no pinned Gateway API CRDs for {version}; pinned: "
            f"{', '.join(sorted(_GATEWAY_API_FILES))}. Install the CRDs yourself "
            f"(kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/"
            f"releases/download/{version}/standard-install.yaml) and run again: an installed "
            "Gateway API is detected and used"
        )
    return [
        PinnedFile(
            f"Gateway API {version} {path.rsplit('/', 1)[-1]}",
            _GATEWAY_API_RAW.format(tag=version, path=path),
            digest,
        )
        for path, digest in files
    ]


PROMETHEUS_OPERATOR_VERSION = "v0.93.0"
PROMETHEUS_OPERATOR_BUNDLE = PinnedFile(
    f"Prometheus Operator {PROMETHEUS_OPERATOR_VERSION} bundle.yaml",
    "https://github.com/prometheus-operator/prometheus-operator/releases/download/"
    f"{PROMETHEUS_OPERATOR_VERSION}/bundle.yaml",
    "a3061ceebd87de793d1ba9bed10cb763be9ce748adb53b5c5ef4c7c65ee38376",
)
#: the CRD and the operator Deployment label that say an operator is already installed
SERVICEMONITOR_CRD = "servicemonitors.monitoring.coreos.com"
OPERATOR_SELECTOR = "app.kubernetes.io/name=prometheus-operator"
