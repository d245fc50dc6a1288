"""The core's own door: TLS and mutual TLS on its gRPC port, the key check on every RPC of its services, a message
limit equal to the bridge's body limit, reflection off unless enabled, and the settings that configure all of it.

Certificates are made here (the `cryptography` package): a CA, a server certificate for 127.0.0.1 and
core.internal, a client certificate, and a second CA with a client certificate of its own that the core must refuse.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.openai.chat.request import parse_chat_request
from bridge.openai.chat.translate import to_params
from bridge.settings import Settings as BridgeSettings
from bridge.settings import SettingsError as BridgeSettingsError
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from modelmax.v1 import key_service_pb2
from services.server import CoreServer
from services.settings import Settings as CoreSettings
from services.settings import SettingsError as CoreSettingsError
from tests.conftest import API_KEY, running_bridge, running_core, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

MODEL = "remote-chat"
SERVER_NAME = "core.internal"  # in the server certificate beside 127.0.0.1, for MODELMAX_CORE_TLS_SERVER_NAME
MiB = 1024 * 1024
SERVICES = [
    svc.DESCRIPTOR.services_by_name["CompletionService"],
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"],
]
METHODS: list[MethodDescriptor] = [method for service in SERVICES for method in service.methods]


# ---- certificates ----


@dataclass(frozen=True)
class Identity:
    """A PEM certificate and its unencrypted private key, as files."""

    cert: Path
    key: Path

    def pair(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


class Authority:
    """A CA that issues certificates: as PEM bytes, or as files in `directory`."""

    def __init__(self, name: str, directory: Path | None = None) -> None:
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        if directory is not None:
            (directory / f"{name}-ca.crt").write_bytes(self.pem)

    @property
    def ca(self) -> Path:
        """The CA certificate's file."""
        assert self._directory is not None, "an Authority made without a directory has no files"
        return self._directory / f"{self.name.rfc4514_string().removeprefix('CN=')}-ca.crt"

    def issue(self, name: str, *, server: bool) -> Identity:
        """A certificate and key for `name`, written as `name`.crt and `name`.key."""
        assert self._directory is not None, "an Authority made without a directory has no files"
        cert, key = self.issue_pem(name, server=server)
        identity = Identity(self._directory / f"{name}.crt", self._directory / f"{name}.key")
        identity.cert.write_bytes(cert)
        identity.key.write_bytes(key)
        return identity

    def issue_pem(self, name: str, *, server: bool) -> tuple[bytes, bytes]:
        """A certificate for `name` (a server's: for 127.0.0.1, localhost and SERVER_NAME; or a client's) and its
        unencrypted key, as PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if server:
            names = [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
                x509.DNSName(SERVER_NAME),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        unencrypted = serialization.NoEncryption()
        return (
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, unencrypted),
        )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Identity
    client: Identity
    other_ca: Authority
    other_client: Identity  # issued by other_ca: a certificate, but not one the core trusts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority("modelmax", directory), Authority("elsewhere", directory)
    return Pki(
        ca,
        ca.issue("core", server=True),
        ca.issue("bridge", server=False),
        other,
        other.issue("intruder", server=False),
    )


def tls_core(catalog_path: str, pki: Pki, *, mutual: bool = False, **overrides: object) -> Any:
    """running_core with TLS (and, `mutual`, client certificates from the CA) on its gRPC port."""
    client_ca = str(pki.ca.ca) if mutual else ""
    return running_core(
        catalog_path,
        None,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=client_ca,
        **overrides,
    )


def credentials(ca: Authority | None, client: Identity | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting `ca` (None: the system's roots), with `client`'s certificate if given."""
    key, chain = client.pair() if client else (None, None)
    return grpc.ssl_channel_credentials(ca.ca.read_bytes() if ca else None, key, chain)


# ---- cores ----


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


def catalog(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1") -> str:
    """One OpenAI-compatible model at `base_url` (by default a closed port: for tests that never reach it)."""
    return write_catalog(
        tmp_path, [{"name": MODEL, "provider": "openai", "model": "fake-model", "options": {"base_url": base_url}}]
    )


async def list_models(channel: grpc.aio.Channel) -> list[str]:
    reply = await svc_grpc.CompletionServiceStub(channel).ListModels(svc.ListModelsRequest(), timeout=5)
    return [model.id for model in reply.models]


async def refused_with(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await list_models(channel)
    return raised.value.code()


def chat(content: str = "Hi", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def post_chat(base_url: str, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(f"{base_url}/chat/completions", content=body, headers=headers)


# ---- TLS and mutual TLS ----


async def test_a_tls_core_and_a_tls_bridge_complete_a_request(
    tmp_path: Path, pki: Pki, upstream: OpenAIUpstream
) -> None:
    async with (
        tls_core(catalog(tmp_path, upstream.url), pki) as core,
        running_bridge(f"127.0.0.1:{core.port}", core_tls_ca_file=str(pki.ca.ca)) as base_url,
    ):
        response = await post_chat(base_url, json.dumps(chat()).encode())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world!"


async def test_the_bridge_verifies_the_name_it_is_told(tmp_path: Path, pki: Pki, upstream: OpenAIUpstream) -> None:
    """MODELMAX_CORE_TLS_SERVER_NAME: the certificate must carry that name, whatever the target's host."""
    async with tls_core(catalog(tmp_path, upstream.url), pki) as core:
        target = f"127.0.0.1:{core.port}"
        for name, status in ((SERVER_NAME, 200), ("not-the-core.internal", 503)):
            async with running_bridge(target, core_tls_ca_file=str(pki.ca.ca), core_tls_server_name=name) as url:
                response = await post_chat(url, json.dumps(chat()).encode())
            assert response.status_code == status, (name, response.text)


async def test_a_tls_core_refuses_plaintext_and_clients_that_do_not_trust_it(tmp_path: Path, pki: Pki) -> None:
    async with tls_core(catalog(tmp_path), pki) as core:
        target = f"127.0.0.1:{core.port}"
        async with core_channel(target) as plaintext:
            assert await refused_with(plaintext) == grpc.StatusCode.UNAVAILABLE
        async with core_channel(target, credentials=credentials(pki.other_ca)) as wrong_ca:
            assert await refused_with(wrong_ca) == grpc.StatusCode.UNAVAILABLE  # the core is authenticated
        async with core_channel(target, credentials=credentials(pki.ca)) as verified:
            assert await list_models(verified) == [MODEL]  # TLS alone: any client with a key


async def test_mutual_tls_admits_only_a_certificate_from_the_client_ca(tmp_path: Path, pki: Pki) -> None:
    async with tls_core(catalog(tmp_path), pki, mutual=True) as core:
        target = f"127.0.0.1:{core.port}"
        async with core_channel(target, credentials=credentials(pki.ca)) as no_certificate:
            assert await refused_with(no_certificate) == grpc.StatusCode.UNAVAILABLE
        async with core_channel(target, credentials=credentials(pki.ca, pki.other_client)) as other_ca:
            assert await refused_with(other_ca) == grpc.StatusCode.UNAVAILABLE
        async with core_channel(target) as plaintext:
            assert await refused_with(plaintext) == grpc.StatusCode.UNAVAILABLE
        async with core_channel(target, credentials=credentials(pki.ca, pki.client)) as admitted:
            assert await list_models(admitted) == [MODEL]


async def test_a_bridge_with_its_client_certificate_completes_a_request_over_mutual_tls(
    tmp_path: Path, pki: Pki, upstream: OpenAIUpstream
) -> None:
    async with tls_core(catalog(tmp_path, upstream.url), pki, mutual=True) as core:
        target = f"127.0.0.1:{core.port}"
        client = {"tls_cert_file": str(pki.client.cert), "tls_key_file": str(pki.client.key)}
        async with running_bridge(target, core_tls_ca_file=str(pki.ca.ca), **client) as base_url:
            response = await post_chat(base_url, json.dumps(chat()).encode())
        assert response.status_code == 200, response.text
        async with running_bridge(target, core_tls_ca_file=str(pki.ca.ca)) as base_url:  # no client certificate
            response = await post_chat(base_url, json.dumps(chat()).encode())
        assert response.status_code == 503, response.text  # the core is unreachable to it
    assert len(upstream.requests) == 1


# ---- the key check, health and reflection ----


def _stub_call(channel: grpc.aio.Channel, method: MethodDescriptor) -> Any:
    """A call of `method` with an empty request, built from its descriptor alone."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    assert not method.client_streaming, "a client-streaming RPC: teach this test to call it"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    callable_ = kind(
        path, request_serializer=request_type.SerializeToString, response_deserializer=response_type.FromString
    )
    return callable_, request_type()


async def _code_of(channel: grpc.aio.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]) -> Any:
    callable_, request = _stub_call(channel, method)
    try:
        call = callable_(request, metadata=metadata, timeout=10)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return "OK"


@pytest.mark.parametrize("mutual", [False, True], ids=["plaintext", "mutual TLS"])
async def test_every_rpc_of_both_services_refuses_a_call_without_a_valid_key(
    tmp_path: Path, pki: Pki, mutual: bool
) -> None:
    """Enumerated from the service descriptors, so a new RPC is checked the day it is added. TLS does not replace
    the key: a client with a trusted certificate and no key is refused too."""
    assert {m.containing_service.name for m in METHODS} == {"CompletionService", "KeyService"} and len(METHODS) >= 11
    async with tls_core(catalog(tmp_path), pki, mutual=True) if mutual else running_core(catalog(tmp_path)) as core:
        target = f"127.0.0.1:{core.port}"
        channel = (
            grpc.aio.secure_channel(target, credentials(pki.ca, pki.client))
            if mutual
            else grpc.aio.insecure_channel(target)
        )
        async with channel:
            for metadata in (
                (),
                (("authorization", "Bearer mm-not-a-key-0123456789abcdef"),),
                (("authorization", API_KEY),),
            ):
                codes = {method.full_name: await _code_of(channel, method, metadata) for method in METHODS}
                assert codes == {name: grpc.StatusCode.UNAUTHENTICATED for name in codes}, metadata


async def test_health_answers_without_a_key(tmp_path: Path, pki: Pki) -> None:
    """Kubernetes' probes carry no key; the health service says only SERVING or NOT_SERVING per service name."""
    async with tls_core(catalog(tmp_path), pki) as core:
        async with grpc.aio.secure_channel(f"127.0.0.1:{core.port}", credentials(pki.ca)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_health_port_serves_health_alone_in_plaintext(tmp_path: Path, pki: Pki) -> None:
    """Kubernetes' gRPC probes cannot speak TLS: MODELMAX_CORE_HEALTH_PORT answers them beside a TLS port."""
    async with tls_core(catalog(tmp_path), pki, mutual=True, health_port=0) as core:
        assert core.health_port not in (None, 0, core.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "modelmax.v1.CompletionService", "modelmax.v1.KeyService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await svc_grpc.CompletionServiceStub(channel).ListModels(
                    svc.ListModelsRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=5
                )
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await core._health.enter_graceful_shutdown()  # what CoreServer.stop does first, before its drain
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def _reflected_services(core: CoreServer) -> set[str] | grpc.StatusCode:
    async with core_channel(f"127.0.0.1:{core.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            replies = [reply async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5)]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return {service.name for service in replies[0].list_services_response.service}


async def test_reflection_is_off_unless_enabled(tmp_path: Path) -> None:
    async with running_core(catalog(tmp_path)) as core:
        assert await _reflected_services(core) == grpc.StatusCode.UNIMPLEMENTED
    async with running_core(catalog(tmp_path), reflection=True) as core:
        listed = await _reflected_services(core)
        assert isinstance(listed, set) and {"modelmax.v1.CompletionService", "modelmax.v1.KeyService"} <= listed
    assert CoreSettings.from_env({"MODELMAX_CORE_REFLECTION": "true"}).reflection is True
    assert CoreSettings.from_env({}).reflection is False


# ---- the message limit ----


def _padded_list_models(size: int) -> bytes:
    """A ListModelsRequest of exactly `size` bytes: one unknown length-delimited field (number 1000) of padding,
    which any proto parser skips, so the core's answer depends on nothing but the size."""
    tag = bytes([0xC2, 0x3E])  # field 1000, wire type 2 (varint of 1000 << 3 | 2)
    for length_bytes in range(1, 6):
        payload = size - len(tag) - length_bytes
        length = _varint(payload)
        if len(length) == length_bytes:
            return tag + length + b"\0" * payload
    raise AssertionError(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_the_core_refuses_a_message_over_its_limit_before_it_reaches_a_servicer(tmp_path: Path) -> None:
    """The limit is the bridge's body limit plus the headroom: a direct gRPC caller gets in no more than an HTTP
    one. gRPC refuses the message itself (RESOURCE_EXHAUSTED, from its length prefix)."""
    settings = CoreSettings()
    assert settings.max_message_bytes == BridgeSettings().max_message_bytes  # the two sides agree
    assert settings.max_body_bytes == BridgeSettings().max_body_bytes == 8 * MiB
    async with running_core(catalog(tmp_path)) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        list_models_raw = channel.unary_unary(
            "/modelmax.v1.CompletionService/ListModels",
            request_serializer=None,  # the bytes as they are
            response_deserializer=svc.ListModelsResponse.FromString,
        )
        at_limit = _padded_list_models(settings.max_message_bytes)
        assert len(at_limit) == settings.max_message_bytes
        reply = await list_models_raw(at_limit, timeout=30)
        assert [model.id for model in reply.models] == [MODEL]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_models_raw(_padded_list_models(settings.max_message_bytes + 1), timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (raised.value.details() or "")  # gRPC's own words, not a servicer's


async def test_the_core_limit_follows_max_body_bytes(tmp_path: Path) -> None:
    settings = CoreSettings.from_env({"MODELMAX_MAX_BODY_BYTES": str(MiB)})
    assert settings.max_body_bytes == MiB
    async with running_core(catalog(tmp_path), max_body_bytes=MiB) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            list_models_raw = channel.unary_unary(
                "/modelmax.v1.CompletionService/ListModels", request_serializer=None, response_deserializer=None
            )
            await list_models_raw(_padded_list_models(settings.max_message_bytes), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await list_models_raw(_padded_list_models(settings.max_message_bytes + 1), timeout=30)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _proto_size(body: bytes) -> int:
    return svc.StreamCompletionRequest(params=to_params(parse_chat_request(body)), accept_batches=True).ByteSize()


def _tools_body(size: int, exponents: int) -> bytes:
    """A chat request body of exactly `size` bytes: a tool whose JSON Schema holds `exponents` numbers written as
    1e15 (the bridge re-serializes each as 1000000000000000.0, 14 bytes longer: the one way a request's proto
    outgrows its JSON), and a user message filling the rest."""
    numbers = ",".join(["1e15"] * exponents)
    tool = f'{{"type":"function","function":{{"name":"pick","parameters":{{"enum":[{numbers}]}}}}}}'
    head = f'{{"model":"{MODEL}","tools":[{tool}],"messages":[{{"role":"user","content":"'
    tail = '"}]}'
    body = (head + "x" * (size - len(head) - len(tail)) + tail).encode()
    assert len(body) == size
    return body


async def test_a_body_at_the_bridge_limit_reaches_the_provider_even_when_its_proto_is_larger(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    """A body of exactly MODELMAX_MAX_BODY_BYTES (the default, 8 MiB) whose proto is larger than the body: the
    headroom lets it through, bridge to core to provider."""
    bridge = BridgeSettings()
    body = _tools_body(bridge.max_body_bytes, exponents=1000)
    assert bridge.max_body_bytes < _proto_size(body) <= bridge.max_message_bytes
    async with running_core(catalog(tmp_path, upstream.url)) as core, running_bridge(f"127.0.0.1:{core.port}") as url:
        response = await post_chat(url, body)
        assert response.status_code == 200, response.text[:500]
        too_large = await post_chat(url, body + b" ")  # one byte over: the bridge's own 413
        assert too_large.status_code == 413
    (received,) = upstream.requests
    assert len(received.body["messages"][0]["content"]) > bridge.max_body_bytes - 20_000


async def test_a_body_whose_proto_outgrows_the_core_limit_is_a_413_from_the_bridge(
    tmp_path: Path, upstream: OpenAIUpstream
) -> None:
    """Under the body limit, but its proto over the core's: the bridge's send limit (the core's receive limit)
    refuses it with gRPC's RESOURCE_EXHAUSTED, which the bridge answers as 413; nothing is sent on."""
    limit = 64 * 1024
    body = _tools_body(limit, exponents=12_000)
    assert _proto_size(body) > BridgeSettings(max_body_bytes=limit).max_message_bytes
    async with (
        running_core(catalog(tmp_path, upstream.url), max_body_bytes=limit) as core,
        running_bridge(f"127.0.0.1:{core.port}", max_body_bytes=limit) as url,
    ):
        response = await post_chat(url, body)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


_text = st.text(max_size=40)
_image = st.binary(min_size=1, max_size=60).map(
    lambda data: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
)
_part = st.one_of(_text.map(lambda text: {"type": "text", "text": text}), _image)
_message = st.one_of(
    st.builds(
        lambda role, text: {"role": role, "content": text}, st.sampled_from(["system", "user", "assistant"]), _text
    ),
    st.lists(_part, min_size=1, max_size=4).map(lambda parts: {"role": "user", "content": parts}),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
_tool = st.builds(
    lambda name, description, schema: {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": {"type": "object", "x": schema}},
    },
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    _text,
    _json,
)


def _schema_tool(text: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": text}}}


_TINY_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
# The edges, beside what hypothesis finds: schemas the bridge re-serializes (non-ASCII must stay UTF-8, not grow to
# \uXXXX escapes), escapes that decode shorter, many tiny messages and many small images.
_EDGES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "x"}], "stop": [], "tools": [_schema_tool("語" * 2000 + "😀" * 1000)],
     "seed": None, "ensure_ascii": False},
    {"messages": [{"role": "user", "content": "é\n\"" * 1000}], "stop": ["é" * 50] * 4, "tools": [], "seed": -1,
     "ensure_ascii": True},
    {"messages": [{"role": "user", "content": ""}] * 2000, "stop": [""] * 4, "tools": [], "seed": -(2**63),
     "ensure_ascii": False},
    {"messages": [{"role": "user", "content": [_TINY_IMAGE] * 500}], "stop": [], "tools": [], "seed": None,
     "ensure_ascii": False},
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(_message, min_size=1, max_size=6),
    stop=st.lists(_text, max_size=4),
    tools=st.lists(_tool, max_size=3),
    seed=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ensure_ascii=st.booleans(),
)
@example(**_EDGES[0])
@example(**_EDGES[1])
@example(**_EDGES[2])
@example(**_EDGES[3])
def test_a_requests_proto_is_no_larger_than_its_json(
    messages: list[dict[str, Any]], stop: list[str], tools: list[dict[str, Any]], seed: int | None, ensure_ascii: bool
) -> None:
    """Why a small headroom is enough: tags and varint lengths are shorter than JSON's keys and quotes, escapes decode
    to fewer bytes and base64 images to 3/4 of theirs. Only numbers the bridge re-serializes longer (above) grow."""
    fields: dict[str, Any] = {"stop": stop, "seed": seed, "temperature": 0.5, "max_tokens": 7}
    if tools:
        fields["tools"] = tools
    body = json.dumps(
        {"model": MODEL, "messages": messages, **fields}, ensure_ascii=ensure_ascii, separators=(",", ":")
    ).encode()
    assert _proto_size(body) <= len(body)


# ---- settings ----


@pytest.fixture
def files(pki: Pki, tmp_path: Path) -> Iterator[dict[str, str]]:
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    yield {
        "cert": str(pki.server.cert),
        "key": str(pki.server.key),
        "ca": str(pki.ca.ca),
        "client_cert": str(pki.client.cert),
        "client_key": str(pki.client.key),
        "encrypted": str(encrypted),
        "garbage": str(garbage),
        "missing": str(tmp_path / "missing.pem"),
    }


CORE_ERRORS = [
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert"}, "MODELMAX_CORE_TLS_KEY_FILE is not set"),
    ({"MODELMAX_CORE_TLS_KEY_FILE": "key"}, "MODELMAX_CORE_TLS_CERT_FILE is not set"),
    ({"MODELMAX_CORE_TLS_CLIENT_CA_FILE": "ca"}, "MODELMAX_CORE_TLS_CLIENT_CA_FILE (mutual TLS) needs"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "missing", "MODELMAX_CORE_TLS_KEY_FILE": "key"},
     "MODELMAX_CORE_TLS_CERT_FILE='{missing}' cannot be read: No such file or directory"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "missing"},
     "MODELMAX_CORE_TLS_KEY_FILE='{missing}' cannot be read"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "key",
      "MODELMAX_CORE_TLS_CLIENT_CA_FILE": "missing"}, "MODELMAX_CORE_TLS_CLIENT_CA_FILE='{missing}' cannot be read"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "key", "MODELMAX_CORE_TLS_KEY_FILE": "key"},
     "MODELMAX_CORE_TLS_CERT_FILE='{key}' holds no PEM certificate"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "cert"},
     "MODELMAX_CORE_TLS_KEY_FILE='{cert}' holds no PEM private key"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "client_key"},
     "MODELMAX_CORE_TLS_CERT_FILE='{cert}' and MODELMAX_CORE_TLS_KEY_FILE='{client_key}' are not a certificate and "
     "its unencrypted private key"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "encrypted"},
     "MODELMAX_CORE_TLS_KEY_FILE='{encrypted}' are not a certificate and its unencrypted private key"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "garbage", "MODELMAX_CORE_TLS_KEY_FILE": "key"},
     "MODELMAX_CORE_TLS_CERT_FILE='{garbage}' and MODELMAX_CORE_TLS_KEY_FILE"),
    ({"MODELMAX_CORE_TLS_CERT_FILE": "cert", "MODELMAX_CORE_TLS_KEY_FILE": "key",
      "MODELMAX_CORE_TLS_CLIENT_CA_FILE": "garbage"},
     "MODELMAX_CORE_TLS_CLIENT_CA_FILE='{garbage}' holds no valid PEM"),
    ({"MODELMAX_CORE_REFLECTION": "maybe"}, "MODELMAX_CORE_REFLECTION='maybe' must be true or false"),
    ({"MODELMAX_MAX_BODY_BYTES": "0"}, "MODELMAX_MAX_BODY_BYTES=0 must be positive"),
    ({"MODELMAX_MAX_BODY_BYTES": "8MiB"}, "MODELMAX_MAX_BODY_BYTES='8MiB' is not a valid int"),
    ({"MODELMAX_CORE_HEALTH_PORT": "50051"}, "MODELMAX_CORE_HEALTH_PORT must differ from MODELMAX_CORE_PORT"),
]  # fmt: skip


def _resolved(env: dict[str, str], files: dict[str, str]) -> dict[str, str]:
    return {name: files.get(value, value) for name, value in env.items()}


@pytest.mark.parametrize(
    ("env", "message"),
    CORE_ERRORS,
    ids=[m.split(" ")[0].split("=")[0] + f"-{i}" for i, (_, m) in enumerate(CORE_ERRORS)],
)
def test_the_core_refuses_tls_settings_it_cannot_serve_with_naming_the_variable(
    env: dict[str, str], message: str, files: dict[str, str]
) -> None:
    with pytest.raises(CoreSettingsError) as raised:
        CoreSettings.from_env({"MODELMAX_API_KEY": API_KEY, **_resolved(env, files)}).check()
    assert message.format(**files) in str(raised.value)


async def test_start_core_checks_the_tls_files_before_it_binds(tmp_path: Path, files: dict[str, str]) -> None:
    with pytest.raises(CoreSettingsError, match="MODELMAX_CORE_TLS_KEY_FILE="):
        async with running_core(catalog(tmp_path), tls_cert_file=files["cert"], tls_key_file=files["missing"]):
            pass


def test_the_core_reads_its_door_from_the_environment(files: dict[str, str]) -> None:
    env = {
        "MODELMAX_CORE_TLS_CERT_FILE": files["cert"],
        "MODELMAX_CORE_TLS_KEY_FILE": files["key"],
        "MODELMAX_CORE_TLS_CLIENT_CA_FILE": files["ca"],
        "MODELMAX_CORE_HEALTH_PORT": "50052",
        "MODELMAX_CORE_REFLECTION": "true",
        "MODELMAX_MAX_BODY_BYTES": "1048576",
        "MODELMAX_API_KEY": API_KEY,
    }
    settings = CoreSettings.from_env(env)
    settings.check()
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == (
        files["cert"], files["key"], files["ca"],
    )  # fmt: skip
    assert (settings.health_port, settings.reflection, settings.max_message_bytes) == (50052, True, MiB + 64 * 1024)
    tls = settings.server_tls()
    assert tls is not None and tls.client_ca == Path(files["ca"]).read_bytes()
    plain = CoreSettings.from_env({})
    assert (plain.server_tls(), plain.health_port, plain.reflection) == (None, None, False)


BRIDGE_ERRORS = [
    ({"MODELMAX_CORE_TLS_CA_FILE": "ca", "MODELMAX_BRIDGE_TLS_CERT_FILE": "client_cert"},
     "MODELMAX_BRIDGE_TLS_KEY_FILE is not set"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "ca", "MODELMAX_BRIDGE_TLS_KEY_FILE": "client_key"},
     "MODELMAX_BRIDGE_TLS_CERT_FILE is not set"),
    ({"MODELMAX_BRIDGE_TLS_CERT_FILE": "client_cert", "MODELMAX_BRIDGE_TLS_KEY_FILE": "client_key"},
     "MODELMAX_BRIDGE_TLS_CERT_FILE needs MODELMAX_CORE_TLS_CA_FILE"),
    ({"MODELMAX_CORE_TLS_SERVER_NAME": "core.internal"},
     "MODELMAX_CORE_TLS_SERVER_NAME needs MODELMAX_CORE_TLS_CA_FILE"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "missing"}, "MODELMAX_CORE_TLS_CA_FILE='{missing}' cannot be read"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "key"}, "MODELMAX_CORE_TLS_CA_FILE='{key}' holds no PEM certificate"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "garbage"}, "MODELMAX_CORE_TLS_CA_FILE='{garbage}' holds no valid PEM"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "ca", "MODELMAX_BRIDGE_TLS_CERT_FILE": "missing",
      "MODELMAX_BRIDGE_TLS_KEY_FILE": "client_key"}, "MODELMAX_BRIDGE_TLS_CERT_FILE='{missing}' cannot be read"),
    ({"MODELMAX_CORE_TLS_CA_FILE": "ca", "MODELMAX_BRIDGE_TLS_CERT_FILE": "client_cert",
      "MODELMAX_BRIDGE_TLS_KEY_FILE": "key"}, "MODELMAX_BRIDGE_TLS_CERT_FILE='{client_cert}' and "
     "MODELMAX_BRIDGE_TLS_KEY_FILE='{key}' are not a certificate and its unencrypted private key"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "message"), BRIDGE_ERRORS, ids=[f"bridge-{i}" for i in range(len(BRIDGE_ERRORS))])
def test_the_bridge_refuses_tls_settings_it_cannot_dial_with_naming_the_variable(
    env: dict[str, str], message: str, files: dict[str, str]
) -> None:
    with pytest.raises(BridgeSettingsError) as raised:
        BridgeSettings.from_env(_resolved(env, files))
    assert message.format(**files) in str(raised.value)


def test_the_bridge_reads_its_tls_from_the_environment(files: dict[str, str]) -> None:
    settings = BridgeSettings.from_env(
        {
            "MODELMAX_CORE_TLS_CA_FILE": files["ca"],
            "MODELMAX_CORE_TLS_SERVER_NAME": SERVER_NAME,
            "MODELMAX_BRIDGE_TLS_CERT_FILE": files["client_cert"],
            "MODELMAX_BRIDGE_TLS_KEY_FILE": files["client_key"],
        }
    )
    tls = settings.core_tls()
    assert tls is not None
    assert (tls.root_certificates, tls.certificate_chain, tls.private_key, tls.server_name) == (
        Path(files["ca"]).read_bytes(),
        Path(files["client_cert"]).read_bytes(),
        Path(files["client_key"]).read_bytes(),
        SERVER_NAME,
    )
    assert BridgeSettings.from_env({}).core_tls() is None


async def test_a_bridge_whose_files_went_missing_fails_its_start_naming_the_variable(files: dict[str, str]) -> None:
    with pytest.raises(BridgeSettingsError, match="MODELMAX_CORE_TLS_CA_FILE="):
        async with running_bridge("127.0.0.1:9", core_tls_ca_file=files["missing"]):
            pass
