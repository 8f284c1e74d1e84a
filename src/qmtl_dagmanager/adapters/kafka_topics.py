"""The Kafka topic admin (confluent-kafka AdminClient).

`ensure` creates many topics in one batched request with one result per topic. Each topic goes
CREATE → VERIFY (describe partitions, replication, retention, cleanup policy) → WAIT (until the
metadata shows it; skipped with `wait_visible=False`: the controller's acknowledgement means
the creation is committed, and the caller sees it through with `unseen`) → BACKOFF (0.5 s
doubling to 4 s, up to 5 attempts, none starting later
than 1.5 admin timeouts after the first) on retriable errors. While a request waits, fresh
metadata is asked for every 0.5 s, so one bound for a broker that died goes to a live one. `delete`
returns once the broker no longer describes the topics, so that WAIT after a re-creation under
the same name sees the new topic, never the old one.

Existence is only ever decided by the controller: every topic of a batch is sent to
CreateTopics, and only "already exists" leads to VERIFY. A cached listing (which may still
show a topic another process deleted a moment ago) is used for collision checks alone. Every
admin error is typed: unknown topics are absent, the rest is Unavailable or a FAILED result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from qmtl_dagmanager.adapters import topic_rules
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.topics import Profile, TopicSpec
from qmtl_dagmanager.ports import TopicResult, TopicState, TopicStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_START = 0.5
BACKOFF_MAX = 4.0
ATTEMPTS = 5
# no attempt starts later than this many admin timeouts after the first: a cluster that
# lost its quorum (each attempt times out) is reported unavailable after two attempts
RETRY_WINDOW = 1.5
# A topic reported as existing but not describable is usually a deletion finishing (KRaft
# takes a few hundred ms): ask again soon, over about 3 s in all.
FLUX_BACKOFF_START = 0.1
FLUX_ATTEMPTS = 6
IN_FLUX = "reported as existing but cannot be described"
SMALL_BATCH = 8  # a batch this small is awaited on the loop; a larger one in a thread hop
REMAP_AFTER = 0.5  # a request pending this long: fresh metadata (see `_batch`)


# Errors that say the cluster could not be reached or answered in time, not that the request
# is wrong: worth retrying, and reported as Kafka being unavailable.
_TRANSIENT_CODES = {
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._MSG_TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_CONTROLLER,
    KafkaError.BROKER_NOT_AVAILABLE,
}


def _transient(err: KafkaError | None) -> bool:
    return (
        err is None
        or bool(err.retriable())
        or err.code() in _TRANSIENT_CODES
        # no broker can take a replica now ("All brokers are currently fenced"): they are
        # restarting or not yet registered again, unlike too few brokers registered
        or (err.code() == KafkaError.INVALID_REPLICATION_FACTOR and "fenced" in err.str())
    )


def _unknown(err: KafkaError | None) -> bool:
    """The topic (or partition) does not exist, or no longer does."""
    return err is not None and err.code() in (
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_ID,
    )


_DENIED = (
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
)


def _seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _error(e: BaseException) -> KafkaError | None:
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        return e.args[0]
    return None


class KafkaTopicAdmin:
    def __init__(
        self,
        bootstrap: str,
        *,
        profile: Profile = Profile.DEVELOPMENT,
        timeout: float = 10.0,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.extra = dict(extra or {})  # security settings, shared with other clients
        self.principal = f"User:{self.extra.get('sasl.username') or 'ANONYMOUS'}"
        self.refused = ""  # the last authentication or TLS failure the client reported
        self._timeout = timeout
        self._profile = profile
        self._listing: tuple[float, int, set[str]] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.listing_ttl = 5.0
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "socket.connection.setup.timeout.ms": int(timeout * 1000),
            "error_cb": self._on_error,
            **(extra or {}),
        }
        self._admin = AdminClient(conf)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            self.refused = str(err.str())
            log.warning("Kafka refused %s: %s", self.principal, self.refused)

    async def _wait(self, fut: Future[T]) -> T:
        if fut.done():  # after `_batch`: no event-loop round trip per topic
            return fut.result()
        return await asyncio.wait_for(asyncio.wrap_future(fut), self._timeout)

    async def _batch(self, futures: Iterable[Future[Any]], topic: str) -> None:
        """Wait for a whole batch of per-topic results (bounded by the timeout); `_wait` then
        reads each without a round trip through the event loop. A small batch is awaited on
        the loop; a large one in thread hops (one loop callback per result would cost more).
        While some are pending, fresh metadata (about `topic`) is asked for every
        REMAP_AFTER seconds: the client sends controller requests (create, delete,
        describe) to the broker its last metadata named, and waits for it while it is down,
        request after request; fresh metadata names a live one."""
        pending = [f for f in futures if not f.done()]
        if not pending:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        on_loop = None
        if len(pending) <= SMALL_BATCH:
            on_loop = [asyncio.wrap_future(f) for f in pending]
            for w in on_loop:  # read through `_wait`: mark the copies' errors as seen
                w.add_done_callback(_seen)
        while pending:
            step = min(REMAP_AFTER, deadline - loop.time())
            if step <= 0:
                return
            if on_loop is None:
                await asyncio.to_thread(concurrent.futures.wait, pending, step)
            else:
                await asyncio.wait(on_loop, timeout=step)
            pending = [f for f in pending if not f.done()]
            if pending:
                await self._remap(topic)

    async def _remap(self, topic: str) -> None:
        """Ask a reachable broker for fresh metadata, about one topic (a full listing grows
        with the cluster): under KRaft it names a live broker as the one to send controller
        requests to, which forwards them to the active controller (see `_batch`)."""
        try:
            await asyncio.to_thread(self._admin.list_topics, topic, timeout=min(self._timeout, 2.0))
        except KafkaException as e:
            log.debug("metadata refresh failed: %s", e)

    async def _names(self) -> tuple[int, set[str]]:
        """The most brokers seen alive and topic names for collision checks, from a full
        metadata listing (it grows with the cluster). Only the first call waits for one;
        after that a listing
        older than `listing_ttl` seconds is refreshed in the background while the current one
        serves (names this admin created since are added as it goes; the broker itself
        refuses a `.`/`_` collision, reported as COLLISION)."""
        now = asyncio.get_running_loop().time()
        if self._listing is None:
            md = await self._metadata()
            self._listing = (now, len(md.brokers), set(md.topics))
        elif now - self._listing[0] > self.listing_ttl and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = asyncio.get_running_loop().create_task(self._relist())
        return self._listing[1], self._listing[2]

    async def _relist(self) -> None:
        try:
            md = await self._metadata()
        except Unavailable as e:
            log.debug("topic listing refresh failed: %s", e)
            return
        # the most brokers seen: one briefly down does not shrink what development creates
        seen = max(len(md.brokers), self._listing[1] if self._listing else 0)
        self._listing = (asyncio.get_running_loop().time(), seen, set(md.topics))

    async def _metadata(self) -> ClusterMetadata:
        try:
            return await asyncio.to_thread(self._admin.list_topics, timeout=self._timeout)
        except KafkaException as e:
            self._admin.poll(0)  # serve error_cb: why the brokers could not be reached
            if self.refused:
                raise Unavailable(
                    f"Kafka refused this client ({self.principal}): {self.refused}",
                    reason="KafkaAuthFailed",
                    retry_after=30.0,
                ) from e
            raise Unavailable(f"Kafka is unreachable: {e}", reason="KafkaUnavailable") from e

    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        results = await self._ensure(topics, wait_visible)
        delay = FLUX_BACKOFF_START
        for _ in range(FLUX_ATTEMPTS - 1):
            # Reported as existing yet not describable: a deletion (or a creation) is still
            # propagating, for example GC dropped the topic a moment ago. Ask again.
            flux = [n for n, r in results.items() if r.message == IN_FLUX]
            if not flux:
                break
            if self._listing is not None:
                self._listing[2].difference_update(flux)
            log.warning(
                "%d topic(s) in flux (being deleted?), asking again in %.1f s", len(flux), delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            results.update(await self._ensure({n: topics[n] for n in flux}, wait_visible))
        return results

    async def _ensure(
        self, topics: Mapping[str, TopicSpec], wait_visible: bool
    ) -> dict[str, TopicResult]:
        if not topics:
            return {}
        brokers, existing = await self._names()
        # under production the controller judges replication (a broker that is down is still
        # registered and takes replicas); development caps at the most brokers seen alive
        judge = None if self._profile is Profile.PRODUCTION else brokers
        specs, results = topic_rules.admit(topics, existing, judge, self._profile)
        verify: list[str] = []
        create = list(specs)  # the controller decides what exists, never the listing
        attempts = dict.fromkeys(create, 0)
        delay = BACKOFF_START
        last_start = asyncio.get_running_loop().time() + RETRY_WINDOW * self._timeout
        while create:
            retry: list[str] = []
            futures = self._admin.create_topics(
                [
                    NewTopic(
                        n,
                        num_partitions=specs[n].partitions,
                        replication_factor=specs[n].replication_factor,
                        config=dict(specs[n].config),
                    )
                    for n in create
                ],
                operation_timeout=self._timeout,
                request_timeout=self._timeout,
            )
            await self._batch(futures.values(), create[0])
            for name, fut in futures.items():
                attempts[name] += 1
                try:
                    await self._wait(fut)
                except (KafkaException, TimeoutError) as e:
                    err = _error(e)
                    if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                        verify.append(name)  # created concurrently, or metadata was stale
                    elif (
                        err is not None
                        and err.code() == KafkaError.INVALID_REPLICATION_FACTOR
                        and not _transient(err)
                    ):
                        results[name] = TopicResult(
                            name,
                            TopicStatus.FAILED,
                            f"replication factor {specs[name].replication_factor} for {name} "
                            f"refused by the controller: {err.str().rstrip('.')}",
                        )
                    elif err is not None and err.code() in _DENIED:
                        results[name] = TopicResult(
                            name,
                            TopicStatus.FORBIDDEN,
                            f"{err.name()}: {err.str().rstrip('.')} for {self.principal}",
                        )
                    elif (
                        err is not None
                        and err.code() == KafkaError.TOPIC_EXCEPTION
                        and "collides" in err.str()
                    ):
                        results[name] = TopicResult(name, TopicStatus.COLLISION, err.str())
                    elif (
                        _transient(err)
                        and attempts[name] < ATTEMPTS
                        and asyncio.get_running_loop().time() + delay < last_start
                    ):
                        retry.append(name)
                    else:
                        results[name] = TopicResult(
                            name,
                            TopicStatus.FAILED,
                            str(err or e),
                            attempts[name],
                            retriable=_transient(err),
                        )
                    continue
                results[name] = TopicResult(name, TopicStatus.CREATED, "", attempts[name])
            if retry:
                log.warning("retrying creation of %d topic(s) in %.1f s", len(retry), delay)
                await asyncio.gather(asyncio.sleep(delay), self._remap(retry[0]))
                delay = min(delay * 2, BACKOFF_MAX)
            create = retry
        created = [n for n, r in results.items() if r.status is TopicStatus.CREATED]
        existing.update(created)
        if wait_visible:
            await self._wait_visible(created)
        if verify:
            states = await self.describe(verify)
            for name in verify:
                state = states.get(name)
                if state is None:
                    results[name] = TopicResult(name, TopicStatus.FAILED, IN_FLUX, retriable=True)
                    continue
                results[name] = topic_rules.existing_result(name, specs[name], state)
        return results

    async def validate(self, topics: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        if not topics:
            return {}
        brokers, existing = await self._names()
        judge = None if self._profile is Profile.PRODUCTION else brokers
        specs, results = topic_rules.admit(topics, existing, judge, self._profile)
        futures = self._admin.create_topics(
            [
                NewTopic(
                    n,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    config=dict(spec.config),
                )
                for n, spec in specs.items()
            ],
            operation_timeout=self._timeout,
            request_timeout=self._timeout,
            validate_only=True,
        )
        if futures:
            await self._batch(futures.values(), next(iter(futures)))
        for name, fut in futures.items():
            try:
                await self._wait(fut)
            except (KafkaException, TimeoutError) as e:
                err = _error(e)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    results[name] = TopicResult(name, TopicStatus.EXISTS)
                elif err is not None and err.code() in _DENIED:
                    results[name] = TopicResult(
                        name,
                        TopicStatus.FORBIDDEN,
                        f"{err.name()}: {err.str().rstrip('.')} for {self.principal}",
                    )
                else:
                    results[name] = TopicResult(
                        name, TopicStatus.FAILED, str(err or e), retriable=_transient(err)
                    )
                continue
            results[name] = TopicResult(name, TopicStatus.CREATED)
        return results

    async def _wait_visible(self, names: list[str]) -> None:
        """WAIT: until the broker describes every created topic (bounded). Only these
        topics are asked for: a full metadata listing grows with the cluster."""
        # polled finely: the broker shows a batch a few ms after the controller commits it,
        # or, behind a backlog of earlier creations, when it has worked through them
        pending = await self._until_described(names, present=True, max_delay=0.2, first=0.02)
        if pending:  # the controller created them; the broker is behind (a backlog)
            log.warning(
                "%d created topic(s) not yet described by the broker after %g s (it is "
                "still applying earlier creations or deletions), e.g. %s",
                len(pending),
                self._timeout,
                pending[0],
            )

    async def unseen(self, topics: Sequence[str]) -> list[str]:
        return await self._not_yet(list(topics), present=True) if topics else []

    async def _not_yet(self, names: list[str], *, present: bool) -> list[str]:
        """One describe request: the names the broker does not describe (`present`), or still
        knows (not `present`). Waiting for presence, any error counts as not yet; waiting for
        absence, only "unknown topic" counts as gone."""
        futures = self._admin.describe_topics(TopicCollection(names), request_timeout=self._timeout)
        still = []
        await self._batch(futures.values(), names[0])
        for name, fut in futures.items():
            try:
                await self._wait(fut)
            except (KafkaException, TimeoutError) as e:
                if present or not _unknown(_error(e)):
                    still.append(name)
                continue
            if not present:
                still.append(name)
        return still

    async def _until_described(
        self, names: list[str], *, present: bool, max_delay: float, first: float = 0.05
    ) -> list[str]:
        """Ask the broker about `names` (`_not_yet`) until it describes each (`present`) or no
        longer knows each (not `present`), for at most the admin's timeout, backing off from
        `first` to `max_delay`; returns the names still not so."""
        pending = list(names)
        delay = first
        deadline = asyncio.get_running_loop().time() + self._timeout
        while pending:
            pending = await self._not_yet(pending, present=present)
            if not pending or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
        return pending

    async def describe(self, topics: Sequence[str]) -> dict[str, TopicState]:
        if not topics:
            return {}
        out: dict[str, TopicState] = {}
        descs = self._admin.describe_topics(
            TopicCollection(list(topics)), request_timeout=self._timeout
        )
        found: dict[str, tuple[int, int]] = {}
        await self._batch(descs.values(), topics[0])
        for name, fut in descs.items():
            try:
                d = await self._wait(fut)
            except (KafkaException, TimeoutError) as e:
                if _unknown(_error(e)):
                    continue
                raise Unavailable(f"describing {name}: {e}", reason="KafkaUnavailable") from e
            rf = len(d.partitions[0].replicas) if d.partitions else 0
            found[name] = (len(d.partitions), rf)
        if not found:
            return out
        resources = [ConfigResource(ResourceType.TOPIC, n) for n in found]
        configs = self._admin.describe_configs(resources, request_timeout=self._timeout)
        await self._batch(configs.values(), topics[0])
        for res, fut in configs.items():
            try:
                entries = await self._wait(fut)
            except (KafkaException, TimeoutError) as e:
                if _unknown(_error(e)):
                    continue  # deleted between the two calls: absent
                raise Unavailable(
                    f"describing the configuration of {res.name}: {e}", reason="KafkaUnavailable"
                ) from e
            partitions, rf = found[res.name]
            out[res.name] = TopicState(
                res.name, partitions, rf, {k: str(v.value) for k, v in entries.items()}
            )
        return out

    async def list_topics(self) -> set[str]:
        return set((await self._metadata()).topics)

    async def delete(self, topics: Sequence[str]) -> dict[str, str | None]:
        """Delete, then wait until the broker no longer describes each deleted topic: a
        topic created again under the same name right after would otherwise be reported
        visible by a broker that still shows the old one."""
        if not topics:
            return {}
        out: dict[str, str | None] = {}
        futures = self._admin.delete_topics(
            list(topics), operation_timeout=self._timeout, request_timeout=self._timeout
        )
        if self._listing is not None:
            self._listing[2].difference_update(topics)
        await self._batch(futures.values(), topics[0])
        for name, fut in futures.items():
            try:
                await self._wait(fut)
                out[name] = None
            except (KafkaException, TimeoutError) as e:
                err = _error(e)
                out[name] = None if _unknown(err) else str(err or e) or "timed out"
        deleted = [n for n, error in out.items() if error is None]
        lingering = await self._until_described(deleted, present=False, max_delay=0.5)
        for name in lingering:
            out[name] = f"deleted, but still described after {self._timeout:g} s"
        return out

    async def message_counts(self, topics: Sequence[str]) -> dict[str, int]:
        md = await self._metadata()
        parts = [
            TopicPartition(t, p) for t in topics if t in md.topics for p in md.topics[t].partitions
        ]
        if not parts:
            return {}
        lows = self._admin.list_offsets(
            {tp: OffsetSpec.earliest() for tp in parts}, request_timeout=self._timeout
        )
        highs = self._admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in parts}, request_timeout=self._timeout
        )
        counts = {t: 0 for t in topics if t in md.topics}
        await self._batch([*lows.values(), *highs.values()], parts[0].topic)
        for tp in parts:
            try:
                low = await self._wait(lows[tp])
                high = await self._wait(highs[tp])
            except (KafkaException, TimeoutError) as e:
                if _unknown(_error(e)):
                    counts.pop(tp.topic, None)  # deleted meanwhile: absent
                    continue
                raise Unavailable(
                    f"reading offsets of {tp.topic}: {e}", reason="KafkaUnavailable"
                ) from e
            if tp.topic in counts:
                counts[tp.topic] += max(0, high.offset - low.offset)
        return counts

    async def broker_count(self) -> int:
        return len((await self._metadata()).brokers)

    async def close(self) -> None:
        return None
