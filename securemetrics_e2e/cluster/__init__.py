"""The cluster backend: the conformance scenarios on a real Kubernetes cluster with Istio.

kind (through pytest-kind-ng) or an existing cluster from a kubeconfig; Istio installed
with istioctl at the chosen version or detected; scenarios deployed from the charts'
rendered manifests with server-side apply. ``plan`` shows every step without touching
anything; ``backend`` runs them.
"""
