"""Redis URLs and the client each one makes: one server, a Redis Cluster, or a Sentinel-managed master.

Accepted forms (`rediss` instead of `redis` = TLS; query arguments are redis-py's connection arguments,
e.g. `?ssl_ca_certs=/etc/fsar/redis-ca.pem`, `?ssl_cert_reqs=none`):

    redis://[user:password@]host:6379/0                     one server (also a managed Redis)
    rediss://[user:password@]host:6380/0                    one server over TLS
    unix:///run/redis.sock?db=0                             one server on a Unix socket
    redis+cluster://[user:password@]h1:7000,h2:7001         Redis Cluster: seed nodes (any few; the rest
                                                            are discovered); database 0 only
    redis+sentinel://[user:password@]s1:26379,s2:26379/mymaster[/db]
                                                            the master Sentinel names `mymaster`; the
                                                            password is the master's; `?sentinel_password=`
                                                            for Sentinels that require one

The store applies the same timeouts and retry policy to every form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.connection import parse_url

Topology = Literal["single", "cluster", "sentinel"]

_SINGLE = {"redis", "rediss", "unix"}
_MULTI = {"redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
          "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True)}


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names: its topology, the nodes to start from and the connection arguments."""

    topology: Topology
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)


def _hosts(netloc: str, default_port: int) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(userinfo@ or "", ((host, port), ...)) of a comma-separated netloc."""
    userinfo, _, hostlist = netloc.rpartition("@")
    nodes = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":") or str(default_port)
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", str(default_port))
        if not host or not port.isdigit():
            raise ValueError(f"bad Redis node {item!r} (want host:port)")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError("a Redis Cluster or Sentinel URL needs at least one host:port")
    return (userinfo + "@" if userinfo else ""), tuple(nodes)


def parse_redis_url(url: str) -> RedisTarget:
    """The `RedisTarget` of a URL; ValueError for a scheme or layout it does not accept."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _SINGLE:
        parse_url(url)  # raises ValueError for a malformed URL now, not at the first request
        return RedisTarget("single", url, tls=scheme == "rediss")
    if scheme not in _MULTI:
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
                         "redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://")
    topology, tls = _MULTI[scheme]
    userinfo, nodes = _hosts(parts.netloc, 6379 if topology == "cluster" else 26379)
    query = dict(parse_qsl(parts.query))
    sentinel_password = query.pop("sentinel_password", None)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    service_name = None
    if topology == "sentinel":
        if not segments:
            raise ValueError("a Sentinel URL names the master: redis+sentinel://host:26379/mymaster[/db]")
        service_name, segments = segments[0], segments[1:]
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError(f"bad database in Redis URL path {parts.path!r}")
    db = segments[0] if segments else "0"
    if topology == "cluster" and db != "0":
        raise ValueError("Redis Cluster has database 0 only")
    # redis-py's own parser turns the credentials and query arguments into typed connection arguments.
    host, port = nodes[0]
    single = f"{'rediss' if tls else 'redis'}://{userinfo}{quote(host, safe=':')}:{port}/{db}"
    options = parse_url(single + (f"?{urlencode(query)}" if query else ""))
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    if topology == "cluster":
        options.pop("db", None)
    sentinel_options: dict[str, Any] = {}
    if sentinel_password is not None:
        sentinel_options["password"] = sentinel_password
    return RedisTarget(topology, url, nodes, service_name, tls, options, sentinel_options)


def connect(target: RedisTarget, *, socket_timeout: float, socket_connect_timeout: float, max_connections: int,
            retry: Any, health_check_interval: float) -> aioredis.Redis | RedisCluster:
    """A client (with its connection pool) for `target`; nothing is contacted until the first command."""
    common = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
                  health_check_interval=health_check_interval)
    if target.topology == "single":
        return aioredis.Redis.from_url(target.url, max_connections=max_connections, retry=retry, **common)
    if target.topology == "cluster":
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            max_connections=max_connections, retry=retry, ssl=target.tls,
                            **common, **target.options)
    tls = {"ssl": True} if target.tls else {}
    sentinel = Sentinel(list(target.nodes),
                        sentinel_kwargs={"socket_timeout": socket_timeout,
                                         "socket_connect_timeout": socket_connect_timeout,
                                         **tls, **target.sentinel_options})
    return sentinel.master_for(target.service_name, redis_class=aioredis.Redis, max_connections=max_connections,
                               retry=retry, **tls, **common, **target.options)
