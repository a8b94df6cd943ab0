/// Tunables of the allocation protocol. Every loop of the protocol has its bound here.
///
/// ```swift
/// var allocator = AllocatorConfiguration()
/// allocator.contentionHigh = 2
/// let cluster = try await EmbeddedCluster.start(.init(allocator: allocator))
/// ```
public struct AllocatorConfiguration: Sendable, Hashable {
    /// A span or section whose commit took at least this many CAS failures is marked
    /// contended; searches avoid contended ones. Measured with `finemem bench` (512 tasks,
    /// 4 KiB): on a 1 GiB pool every threshold gives the same figures (0.005 CAS retries
    /// per allocation: the marks never fire); on a 16 MiB pool, over seeds 1-3, thresholds
    /// 2, 3 and "off" (1000) stay within run-to-run noise of each other (1.58-1.76 round
    /// trips per allocation). 3 is kept; the losses there are mostly to other nodes'
    /// pending logs, which contention marks do not address.
    public var contentionHigh = 3
    /// A contended span or section whose commit took at most this many failures is
    /// returned to normal.
    public var contentionLow = 0
    /// Choices an allocation or free may spend (a lost commit CAS, a transition that no
    /// longer applied) before it answers `retryLimitExceeded`.
    public var operationAttemptsMax = 256
    /// Lost CASes a span open may take on the span header before it gives the span back.
    public var spanOpenAttemptsMax = 64
    /// Lost CASes a span-state change on a section header (returning a span) may take.
    public var spanStateAttemptsMax = 256
    /// Lost CASes a search hint may take; a hint is best effort.
    public var hintAttemptsMax = 4
    /// Lost CASes a log flush may take before it leaves the log to recovery.
    public var flushAttemptsMax = 256
    /// Waits (with backoff) for someone else's progress: a pending log, a busy header or
    /// intent slot, an own flush in flight.
    public var waitCountMax = 10_000
    /// How long the background flush of a log waits before it takes its job, in
    /// nanoseconds: an operation on the same header within that time folds the flush into
    /// its own commit's doorbell instead. 0 starts the flush at once.
    public var upkeepDelayNanos: UInt64 = 0
    /// How long a room summary sync waits before it starts, in nanoseconds: the syncs this
    /// node queues meanwhile for sections of the same summary word join it, so that a node
    /// filling or emptying sections one after another syncs each word once per period
    /// instead of once per section. Other nodes see the room this long later (the summary
    /// is a hint they use when their caches show no room).
    public var roomSummaryDelayNanos: UInt64 = 20_000
    /// How long an upkeep worker that found nothing to do sleeps before it looks again,
    /// and how many such sleeps in a row it takes before it ends. A worker that lingers
    /// drains the upkeep of many operations per wake-up, so that a steady stream of
    /// operations spawns no task and hands nothing to another thread per operation. It is
    /// also how long a header must go without an operation of this node before the
    /// upkeep flushes its last log: while operations keep folding each other's logs on a
    /// header, a flush would only race them.
    public var upkeepIdleNanos: UInt64 = 100_000
    public var upkeepIdleRounds = 8
    /// How many idle periods in a row the upkeep leaves a header in use alone before it
    /// flushes the header's log anyway: while this node's operations keep a log of theirs
    /// pending there, no other compute node can commit on the header, so it gets a turn at
    /// least this often.
    public var upkeepDeferralsMax = 4
    /// Shards of a compute node's header cache of each memory node (consecutive sections,
    /// each under its own lock; at least 4 sections each): tasks on different CPUs search
    /// and commit in different shards. nil: one per task the runtime runs at the same time
    /// (`Runtime.parallelism`: one per CPU on real threads, one in virtual time).
    public var cacheShards: Int?
    /// The first and the longest backoff between waits, in nanoseconds.
    public var backoffNanosMin: UInt64 = 500
    public var backoffNanosMax: UInt64 = 128_000

    /// The backoff's range, first to longest pause.
    var backoffNanos: ClosedRange<UInt64> { backoffNanosMin...backoffNanosMax }

    public init() {}
}

/// Chooses the memory node an allocation tries first; the others follow in index order
/// (wrapping around), as fallbacks when it is full.
package protocol PlacementPolicy: Sendable {
    /// The index, among `memoryNodeCount` nodes, of the node to try first for the
    /// `sequence`-th allocation of a compute node.
    func firstNode(memoryNodeCount: Int, chunkCountLog2: Int, sequence: UInt64) -> Int
}

/// Round-robin across memory nodes, falling back to the others when one is full.
package struct RoundRobinPlacement: PlacementPolicy {
    package init() {}
    package func firstNode(memoryNodeCount: Int, chunkCountLog2: Int, sequence: UInt64) -> Int {
        Int(sequence % UInt64(memoryNodeCount))
    }
}
