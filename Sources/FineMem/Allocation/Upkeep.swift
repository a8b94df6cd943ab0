/// Upkeep after the answer: the log flushes, span closes and hints that follow a commit,
/// and the flush of a multi-section operation. An operation queues its upkeep and
/// returns; the node's upkeep workers drain the queue. No task is spawned per operation:
/// a worker that finds the queue empty lingers (`AllocatorConfiguration.upkeepIdleNanos`,
/// `upkeepIdleRounds`) before it ends, and a new worker starts only when none is idle and
/// the queue outgrows the busy ones, so a steady stream of operations keeps the same few
/// workers, each draining many operations' upkeep per wake-up. A log still queued when
/// the next operation on its header commits is folded into that commit's doorbell
/// (`LogHandling.commit`) and costs no round trip of its own.
///
/// A header has one item queued at a time (`PendingLogTable.queueUpkeep`). A header in use
/// is left alone: when the worker picks its item up and finds that a newer log of this
/// node has replaced the one the item was queued for, or that an operation holds the log
/// to fold it in, the next operation on the header will likely fold that one in too, so
/// the item goes back in the queue, due one idle period (`upkeepIdleNanos`) later. The log
/// is flushed once a whole period passed without an operation on the header.
///
/// Or after `upkeepDeferralsMax` periods in a row: while a log of this node is pending,
/// no other compute node can commit on the header (its CAS predicts the flushed word), so
/// the header gets a turn. The worker flushes, and for half the longest backoff
/// (`backoffNanosMax`) this node's searches pass the header by, and its frees of blocks
/// there wait for the turn to end (`BusyHeaders.beginTurn`, `insertOutsideTurn`): another
/// node's retry, at most one backoff apart, lands in a turn now and then, and its waits
/// are bounded (`waitCountMax`) far beyond that. (A
/// flush alone was no turn: the next operation of this node landed right behind it while
/// the other node slept its backoff, and under a dense enough load it waited until
/// `retryLimitExceeded`: found by an adversarial review. Turns of two backoffs cost the
/// 512-task bench 1 % more round trips per allocation and twice the p99 latency.) A
/// header in use costs the worker a look per period and a turn every few, never a flush
/// per operation that races the next one. One limit remains: a node whose operations on
/// a header come back to back, with no pause, keeps another node waiting until it pauses.
///
/// The queue is FIFO among the items due: a header's flush is due `upkeepDelayNanos` after
/// it was queued (a job at once), an item put back for later when it says, and an item
/// due waits only for the items due ahead of it.
enum UpkeepItem: Sendable {
    /// The log of this node on a header of the link at `link` (an index into `links`):
    /// flush it, and for a span, close or hint it. `serial` names the log it was queued
    /// for (`PendingLog.serial`); `deferrals` counts the periods it was put back for.
    case header(link: Int, HeaderSlot, due: UInt64, serial: UInt64, deferrals: Int)
    /// The room summary bits of `sections` of the link at `link`, after a CAS of this
    /// node changed their room (or a full refresh found them stale), from `due` on.
    case roomSummary(link: Int, sections: Range<Int>, due: UInt64)
    /// Any other upkeep (a multi-section flush).
    case job(due: UInt64, @Sendable () async -> OperationTrace)

    var due: UInt64 {
        switch self {
        case .header(_, _, let due, _, _), .job(let due, _), .roomSummary(_, _, let due): due
        }
    }

    /// This item with the sections of `other` added, when both are room summary syncs of
    /// one link whose sections share a summary word; nil otherwise.
    func merging(_ other: UpkeepItem) -> UpkeepItem? {
        guard case .roomSummary(let link, let sections, let due) = self, case .roomSummary(link, let more, _) = other else { return nil }
        let union = min(sections.lowerBound, more.lowerBound)..<max(sections.upperBound, more.upperBound)
        guard RoomSummary.word(of: union.lowerBound) == RoomSummary.word(of: union.upperBound - 1) else { return nil }
        return .roomSummary(link: link, sections: union, due: due)
    }
}

/// The upkeep queue of one compute node and the state of its workers.
struct UpkeepQueue: Sendable {
    private var items: [UpkeepItem] = []
    private var head = 0
    /// Workers running, and how many of them are lingering on an empty queue.
    private(set) var workers = 0
    private(set) var idleWorkers = 0
    /// Items queued or being worked on: what `quiesce()` waits for.
    private(set) var outstanding = 0

    var queued: Int { items.count - head }

    /// Puts back an item a worker took and left for later (it is still outstanding).
    mutating func putBack(_ item: UpkeepItem) { items.append(item) }

    /// How many of the newest queued items a room summary sync looks through for one to
    /// join.
    static let mergeWindow = 64

    /// Queues `item`; answers whether a worker should be started for it. A room summary
    /// sync joins a queued one of the same summary word instead (it has not started, so
    /// its reads still come after the CAS that queued this one).
    mutating func push(_ item: UpkeepItem, workersMax: Int) -> Bool {
        if case .roomSummary = item {
            for index in stride(from: items.count - 1, through: max(head, items.count - Self.mergeWindow), by: -1) {
                if let merged = items[index].merging(item) {
                    items[index] = merged
                    return false
                }
            }
        }
        items.append(item)
        outstanding += 1
        guard idleWorkers == 0, workers < workersMax, queued > workers else { return false }
        workers += 1
        return true
    }

    /// The first item due by `now`, or when none is, the earliest due time.
    mutating func pop(now: UInt64) -> (item: UpkeepItem?, dueAt: UInt64?) {
        guard head < items.count else { return (nil, nil) }
        var earliest = UInt64.max
        for index in head..<items.count {
            let due = items[index].due
            guard due <= now else {
                earliest = min(earliest, due)
                continue
            }
            let item = items[index]
            if index == head { head += 1 } else { items.remove(at: index) }
            if head == items.count {
                items.removeAll(keepingCapacity: true)
                head = 0
            }
            return (item, nil)
        }
        return (nil, earliest)
    }

    /// How many times the item of `slot` waiting in the queue was put back, or nil when
    /// none waits (none queued, or a worker holds it): for tests that act at a moment of
    /// the deferral.
    func deferrals(of slot: HeaderSlot) -> Int? {
        for item in items[head...] {
            if case .header(_, let queued, _, _, let deferrals) = item, queued == slot { return deferrals }
        }
        return nil
    }

    mutating func finished() { outstanding -= 1 }
    mutating func idle(_ lingering: Bool) { idleWorkers += lingering ? 1 : -1 }
    mutating func workerEnded() { workers -= 1 }
}

extension BlockAllocator {
    /// Most upkeep workers one node runs.
    static let upkeepWorkersMax = 64

    /// Queues `body` as upkeep of this node (`quiesce()` waits for it).
    func startUpkeep(_ body: @escaping @Sendable () async -> OperationTrace) {
        enqueueUpkeep(.job(due: 0, body))
    }

    /// Queues the upkeep of a header with a log of this node to flush, unless an item for
    /// it is queued already: a span header may also be closed or hinted (`spanUpkeep`); a
    /// section header is flushed.
    func startUpkeep(of slot: HeaderSlot, on link: MemoryNodeLink) {
        if let serial = link.cache.withShard(of: slot, { $0.pending.queueUpkeep(slot) }) { queueUpkeep(of: slot, serial: serial, on: link) }
    }

    /// Queues the upkeep of `slot` for its log with `serial`, whose mark in the pending
    /// table the caller just set.
    func queueUpkeep(of slot: HeaderSlot, serial: UInt64, on link: MemoryNodeLink) {
        enqueueUpkeep(.header(link: link.index, slot, due: upkeepDue(), serial: serial, deferrals: 0))
    }

    private func upkeepDue() -> UInt64 {
        configuration.upkeepDelayNanos == 0 ? 0 : runtime.nowNanoseconds + configuration.upkeepDelayNanos
    }

    /// Queues the sync of the room summary bits of `sections` on `link`.
    func startRoomSummaryUpkeep(of sections: Range<Int>, on link: MemoryNodeLink) {
        let due = configuration.roomSummaryDelayNanos == 0 ? 0 : runtime.nowNanoseconds + configuration.roomSummaryDelayNanos
        enqueueUpkeep(.roomSummary(link: link.index, sections: sections, due: due))
    }

    private func enqueueUpkeep(_ item: UpkeepItem) {
        if upkeep.withLock({ $0.push(item, workersMax: Self.upkeepWorkersMax) }) {
            spawn { [self] in await upkeepWorker() }
        }
    }

    /// One upkeep worker: takes due items one at a time; on an empty queue it lingers
    /// `upkeepIdleRounds` sleeps of `upkeepIdleNanos` before it ends; an item not due yet
    /// is waited for.
    private func upkeepWorker() async {
        var idleRounds = 0
        var performed = false
        var later: UpkeepItem?
        while true {
            let now = runtime.nowNanoseconds
            let (item, dueAt) = upkeep.withLock { queue -> (UpkeepItem?, UInt64?) in
                // The item performed last finishes (or goes back, for later) here, in the
                // same lock as the next pop.
                if let later { queue.putBack(later) } else if performed { queue.finished() }
                let next = queue.pop(now: now)
                if next.item == nil, next.dueAt == nil, idleRounds >= configuration.upkeepIdleRounds {
                    queue.workerEnded()
                } else if next.item == nil {
                    queue.idle(true)
                }
                return next
            }
            performed = false
            later = nil
            guard let item else {
                if let dueAt {
                    await runtime.sleep(nanoseconds: dueAt - now)
                } else {
                    if idleRounds >= configuration.upkeepIdleRounds { return }
                    idleRounds += 1
                    await runtime.sleep(nanoseconds: configuration.upkeepIdleNanos)
                }
                upkeep.withLock { $0.idle(false) }
                continue
            }
            idleRounds = 0
            if case .header(let index, let slot, _, let serial, let deferrals) = item {
                let pick = links[index].cache.withShard(of: slot) {
                    $0.pickUpkeep(slot, queuedFor: serial, mayDefer: deferrals < configuration.upkeepDeferralsMax,
                                  turnEnds: now + configuration.backoffNanosMax / 2)
                }
                if case .later(let newer) = pick {
                    later = .header(link: index, slot, due: now + configuration.upkeepIdleNanos, serial: newer, deferrals: deferrals + 1)
                    continue
                }
            }
            let trace = await perform(item)
            // Most items find their log folded into a later commit: nothing to record.
            if trace != OperationTrace() { recordStatistics(nil) { $0.recordUpkeep(trace) } }
            performed = true
        }
    }

    /// Performs an item (a header's, once `HeaderCache.pickUpkeep` let it go).
    private func perform(_ item: UpkeepItem) async -> OperationTrace {
        switch item {
        case .job(_, let body):
            return await body()
        case .roomSummary(let index, let sections, _):
            var trace = OperationTrace()
            do {
                try await links[index].syncRoomSummary(
                    sections: sections, attemptsMax: MemoryNodeLink.roomSummarySyncAttemptsMax,
                    backoffNanos: configuration.backoffNanos, runtime: runtime, trace: &trace)
            } catch {
                trace.upkeepErrors += 1
            }
            return trace
        case .header(let index, let slot, _, _, _):
            let link = links[index]
            var trace = OperationTrace()
            switch slot {
            case .span(let section, let span): await spanUpkeep(section: section, span: span, on: link, trace: &trace)
            case .section: _ = await flush(SectionHeader.self, slot, on: link, trace: &trace)
            }
            return trace
        }
    }

    /// Waits until every log flush and every span and section upkeep queued so far has
    /// finished (the upkeep is bounded; this waits for it without a bound of its own).
    package func quiesce() async {
        var pause = Pause(configuration.backoffNanos)
        while upkeep.withLock({ $0.outstanding }) > 0 { await pause.sleep(on: runtime) }
    }
}
