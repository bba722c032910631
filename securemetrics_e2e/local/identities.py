"""Workload and scraper certificates on demand: the local backend's rotation operations.

What :class:`~securemetrics_e2e.rotation.RotatingBackend` asks of a backend, over the
state :class:`.backend.LocalBackend` holds: issue and rotate a workload's certificate
(published through SDS) and the scraper's OUTPUT_CERTS files, and drop the scraper's
kept-alive connections so the next scrape handshakes anew.

The suite's own probes present the scraper's files too, and a rotation window may
renew them while other units are probed (:mod:`securemetrics_e2e.windows`): each probe
presents a private copy taken under the lock the renewals hold
(:meth:`IdentityOperations.scraper_snapshot`), never a chain and a key of two renewals.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from securemetrics_e2e.backend import Credential, Workload
from securemetrics_e2e.errors import EnvironmentProblem, UsageError
from securemetrics_e2e.local.bootstrap import (
    SdsFiles,
    sds_secret_default,
    sds_secret_rootca,
)
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.local.netns import Pod
from securemetrics_e2e.local.pods import SCRAPER_NAMESPACE, SCRAPER_SERVICE_ACCOUNT, WorkloadRuntime
from securemetrics_e2e.pki import KEY_MODE, MeshCA, OutputCerts, WorkloadIdentity, atomic_write
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

#: a probe does not start with a scraper certificate this close to expiry while a
#: renewal may be on its way: a probe (connect and read, 3 s each) must not see its
#: own client certificate expire in the middle (the rotation window's first, aged
#: certificate lives 4 s and is renewed within milliseconds)
SNAPSHOT_MIN_LIFETIME = timedelta(seconds=10)
#: how long a probe waits for that renewal before presenting what the files hold
SNAPSHOT_RENEWAL_WAIT_S = 1.0


class IdentityOperations:
    """Issuing and rotating certificates, a part of :class:`.backend.LocalBackend`."""

    ca: MeshCA
    foreign_ca: MeshCA
    fault: Fault | None
    scraper_pod: Pod
    scraper_certs: OutputCerts
    foreign_certs: OutputCerts
    workdir: Path
    _started: bool
    #: held while the scraper's files are replaced or copied for a probe
    _scraper_lock: threading.Lock

    def runtime_of(self, workload: Workload) -> WorkloadRuntime:
        raise NotImplementedError

    def write_sds(
        self, sds: SdsFiles, identity: WorkloadIdentity, fault: Fault | None = None
    ) -> None:
        """(Re)publish a proxy's secrets; Envoy picks up the atomic rename by itself."""
        roots = self.ca.root_pem
        if fault is Fault.FOREIGN_ROOT_TRUSTED:
            roots += self.foreign_ca.root_pem
        atomic_write(sds.rootca, json.dumps(sds_secret_rootca(roots)).encode(), 0o644)
        default = sds_secret_default(identity.cert_chain_pem(), identity.key_pem())
        atomic_write(sds.default, json.dumps(default).encode(), KEY_MODE)

    def rotate_workload(self, workload: Workload) -> WorkloadIdentity:
        """Issue a new certificate for ``workload`` and publish it through SDS."""
        runtime = self.runtime_of(workload)
        runtime.identity = self.ca.rotate(runtime.identity)
        self.write_sds(runtime.sds, runtime.identity, runtime.fault)
        return runtime.identity

    def identity_of(self, workload: Workload) -> WorkloadIdentity:
        return self.runtime_of(workload).identity

    def issue_workload(
        self, workload: Workload, lifetime: timedelta, *, expires_in: timedelta | None = None
    ) -> WorkloadIdentity:
        """Give ``workload`` a fresh certificate of ``lifetime``; later rotations keep it.
        ``expires_in``: issued already aged, so that it expires that long from now."""
        runtime = self.runtime_of(workload)
        runtime.identity = self.ca.issue(
            workload.namespace,
            workload.spec.service_account,
            lifetime=lifetime,
            not_before=_aged(lifetime, expires_in),
        )
        self.write_sds(runtime.sds, runtime.identity, runtime.fault)
        return runtime.identity

    def scraper_identity(self) -> WorkloadIdentity:
        """What the scraper's OUTPUT_CERTS files hold now: what Prometheus presents."""
        files = self._scraper_files()
        with self._scraper_lock:
            return _identity_from_files(files)

    @contextlib.contextmanager
    def client_certs(self, credential: Credential) -> Iterator[OutputCerts | None]:
        """The files a probe with ``credential`` presents; the scraper's as a private copy,
        as a rotation window may be renewing them right now."""
        if credential is Credential.SCRAPER:
            with self.scraper_snapshot() as copy:
                yield copy
        else:
            yield self.foreign_certs if credential is Credential.FOREIGN_CA else None

    @contextlib.contextmanager
    def scraper_snapshot(self) -> Iterator[OutputCerts]:
        """A private copy of the scraper's OUTPUT_CERTS files for one probe, removed after.

        Copied under the lock renewals hold, so chain and key belong together; a
        certificate about to expire is first given :data:`SNAPSHOT_RENEWAL_WAIT_S` to
        be renewed (a rotation window renews it within milliseconds; a scraper whose
        files are never refreshed keeps it, and the probe then meets the expiry).
        """
        files = self._scraper_files()

        def lasting() -> None:
            with self._scraper_lock:
                left = files.chain()[0].not_valid_after_utc - datetime.now(UTC)
            if left < SNAPSHOT_MIN_LIFETIME:
                raise NotYet(f"the scraper's certificate expires in {left}")

        with contextlib.suppress(WaitTimeout):
            wait_for("a renewal of the scraper's certificate", lasting,
                     timeout=SNAPSHOT_RENEWAL_WAIT_S)  # fmt: skip
        directory = Path(tempfile.mkdtemp(prefix=".probe-certs-", dir=self.workdir))  # 0700
        try:
            copy = OutputCerts(
                directory,
                directory / files.root_cert.name,
                directory / files.cert_chain.name,
                directory / files.key.name,
            )
            with self._scraper_lock:
                contents = [
                    (copy.root_cert, files.root_cert.read_bytes(), 0o644),
                    (copy.cert_chain, files.cert_chain.read_bytes(), 0o644),
                    (copy.key, files.key.read_bytes(), KEY_MODE),
                ]
            for target, data, mode in contents:  # the key is private from its creation
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            yield copy
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def issue_scraper(
        self, lifetime: timedelta, *, expires_in: timedelta | None = None
    ) -> WorkloadIdentity:
        """The scraper's agent gets a fresh certificate of ``lifetime`` (written always);
        ``expires_in`` as for :meth:`issue_workload`."""
        self._scraper_files()
        identity = self.ca.issue(
            SCRAPER_NAMESPACE,
            SCRAPER_SERVICE_ACCOUNT,
            lifetime=lifetime,
            not_before=_aged(lifetime, expires_in),
        )
        self._write_scraper(identity)
        return identity

    def rotate_scraper(self) -> WorkloadIdentity:
        """Renew the scraper's OUTPUT_CERTS as istio-agent does: new key, same lifetime.

        Each file is replaced by an atomic rename, the chain last, so Prometheus (which
        reloads its client certificate when the files change) never reads a key that
        does not match the chain. Under SCRAPER_CERTS_NOT_REFRESHED nothing is written.
        """
        current = self.scraper_identity()
        if self.fault is Fault.SCRAPER_CERTS_NOT_REFRESHED:
            return current
        identity = self.ca.rotate(current)
        self._write_scraper(identity)
        return identity

    def reset_scraper_connections(self, workload: Workload) -> None:
        """Drop the scraper's established connections to ``workload``'s pod.

        Prometheus keeps its scrape connections alive, and Envoy checks a client
        certificate only in the handshake: an expired scraper certificate stays
        invisible until a connection is re-established (a pod restart, a network blip).
        Dropping them makes the next scrape handshake with what the files hold now.
        """
        argv = ["ss", "-K", "-t", "state", "established", "dst", workload.pod_ip]
        if self.scraper_pod.netns is None:
            argv += ["src", self.scraper_pod.ip]
        done = subprocess.run(
            self.scraper_pod.command(argv), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise EnvironmentProblem(
                f"cannot drop the scraper's connections with `{' '.join(argv)}` "
                f"(exit {done.returncode}: {done.stderr.strip()}); it needs root and a "
                "kernel with CONFIG_INET_DIAG_DESTROY"
            )

    def _scraper_files(self) -> OutputCerts:
        if not self._started:
            raise UsageError("the local backend has no scraper before the first deploy")
        return self.scraper_certs

    def _write_scraper(self, identity: WorkloadIdentity) -> None:
        """Replace the three OUTPUT_CERTS files with renames done back to back.

        Prometheus re-reads chain and key on every scrape: between two renames it can
        load a chain and a key that do not belong together ("private key does not match
        public key") and lose that scrape. Staging all three first (written and
        fsynced) shrinks that window from the fsyncs' milliseconds to microseconds;
        no set of separate files can close it (istio-agent writes them one by one).
        The renames keep the GIL (:func:`_renames_holding_the_gil`): os.replace gives
        it up in each call, and a probe thread running beside a continuity window then
        held it for up to a switch interval (5 ms) between two renames.
        """
        files = self._scraper_files()
        staged: list[tuple[Path, Path]] = []
        try:
            for target, data, mode in (
                (files.root_cert, identity.root_pem(), 0o644),
                (files.key, identity.key_pem(), KEY_MODE),
                (files.cert_chain, identity.cert_chain_pem(), 0o644),
            ):
                staging = files.directory / f".{target.name}.staged"
                staged.append((atomic_write(staging, data, mode), target))
            with self._scraper_lock:  # a probe's snapshot sees all three or none
                _renames_holding_the_gil(staged)
        finally:
            for staging, _ in staged:
                staging.unlink(missing_ok=True)


#: libc through ctypes.PyDLL: unlike CDLL, its calls do not release the GIL
_LIBC = ctypes.PyDLL(None, use_errno=True)


def _renames_holding_the_gil(pairs: list[tuple[Path, Path]]) -> None:
    """rename(2) each (source, target), back to back, without letting another Python
    thread run in between."""
    for source, target in pairs:
        if _LIBC.rename(os.fsencode(source), os.fsencode(target)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(source))


def _identity_from_files(files: OutputCerts) -> WorkloadIdentity:
    chain = files.chain()
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise UsageError(f"{files.key} holds a {type(key).__name__}; expected an EC or RSA key")
    return WorkloadIdentity(
        spiffe_id=_spiffe_id_of(chain[0]),
        cert=chain[0],
        key=key,
        chain=tuple(chain),
        root_cert=files.root(),
    )


def _spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return SpiffeId.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _aged(lifetime: timedelta, expires_in: timedelta | None) -> datetime | None:
    """The not_before that makes a certificate of ``lifetime`` expire ``expires_in`` from
    now (None: valid from now)."""
    if expires_in is None:
        return None
    return datetime.now(UTC) - (lifetime - expires_in)
