/// Counters of one compute node's allocator (or, summed, of a cluster).
///
/// ```swift
/// let statistics = cluster.statistics
/// print(statistics.roundTripsPerAllocation, statistics.casRetriesAverage)
/// ```
public struct AllocatorStatistics: Sendable, Hashable {
    /// Upper bounds of the CAS-retry histogram buckets (the last bucket is open).
    public static let retryBucketBounds: [UInt64] = [0, 1, 2, 4, 8, 16, 32, 64]
    /// Buckets of `answerRoundTrips`: 0 to 63 round trips, then one for more.
    public static let answerRoundTripsBuckets = 65

    public package(set) var allocations: UInt64 = 0
    public package(set) var frees: UInt64 = 0
    public package(set) var failedAllocations: UInt64 = 0
    public package(set) var failedFrees: UInt64 = 0
    /// CAS failures summed over successful allocations.
    public package(set) var casRetries: UInt64 = 0
    /// The part of `casRetries` lost to a pending log (its flush had not landed yet), as
    /// opposed to another operation's commit.
    public package(set) var casRetriesOnPendingLog: UInt64 = 0
    public package(set) var casRetriesMax: UInt64 = 0
    /// Allocations by CAS failures: bucket i counts those with at most `retryBucketBounds[i]`
    /// (and more than the previous bound); the last bucket counts the rest.
    public package(set) var retryHistogram: [UInt64] = Array(repeating: 0, count: AllocatorStatistics.retryBucketBounds.count + 1)
    /// Answers of `allocate` (blocks and `outOfMemory`) by the round trips posted before
    /// them: bucket i counts those with i round trips; the last bucket counts the rest.
    public package(set) var answerRoundTrips: [UInt64] = Array(repeating: 0, count: AllocatorStatistics.answerRoundTripsBuckets)
    /// The most round trips before one answer (block or `outOfMemory`).
    public package(set) var answerRoundTripsMax: UInt64 = 0
    /// `outOfMemory` answers, with their round trips and CAS failures (not counted in
    /// `casRetries`, which is per allocation).
    public package(set) var outOfMemoryAnswers: UInt64 = 0
    public package(set) var outOfMemoryBatches: UInt64 = 0
    public package(set) var outOfMemoryRetries: UInt64 = 0
    public package(set) var outOfMemoryRetriesMax: UInt64 = 0
    /// Batches (network round trips) and verbs posted before an allocation returned.
    public package(set) var allocationBatches: UInt64 = 0
    public package(set) var allocationVerbs: UInt64 = 0
    /// The same for frees.
    public package(set) var freeBatches: UInt64 = 0
    public package(set) var freeVerbs: UInt64 = 0
    /// Batches and verbs of upkeep after the answer (log flushes, span and section state).
    public package(set) var upkeepBatches: UInt64 = 0
    public package(set) var upkeepVerbs: UInt64 = 0
    /// Spans this node put into chunk mode, and spans it returned to their sections.
    public package(set) var spansOpened: UInt64 = 0
    public package(set) var spansClosed: UInt64 = 0
    /// Full re-reads of a memory node's headers (when the cache showed no room).
    public package(set) var refreshes: UInt64 = 0
    /// Refreshes an operation took from another task's read in flight instead of its own.
    public package(set) var refreshesShared: UInt64 = 0
    /// Looks for room through the memory node's room summary (a few KiB each) before a
    /// full refresh, and the bytes all refreshes read.
    public package(set) var summaryRefreshes: UInt64 = 0
    public package(set) var refreshBytes: UInt64 = 0
    /// Room summary syncs after a section's room changed (or a full refresh found the
    /// summary stale).
    public package(set) var summarySyncs: UInt64 = 0
    /// Room summary syncs given up under contention that outlasted their bound (the bits
    /// stay stale until a full refresh finds them).
    public package(set) var summarySyncsAbandoned: UInt64 = 0
    /// Rounds log flushes waited out (with backoff) because their header kept changing.
    public package(set) var flushRounds: UInt64 = 0
    /// Background upkeep (flushes, span closes, hints) that ended in an error.
    public package(set) var upkeepErrors: UInt64 = 0

    package init() {}

    public var casRetriesAverage: Double { allocations == 0 ? 0 : Double(casRetries) / Double(allocations) }
    public var roundTripsPerAllocation: Double { allocations == 0 ? 0 : Double(allocationBatches) / Double(allocations) }
    public var verbsPerAllocation: Double { allocations == 0 ? 0 : Double(allocationVerbs) / Double(allocations) }
    /// Batches of successful allocations and frees, and of upkeep.
    package var batchesTotal: UInt64 { allocationBatches + freeBatches + upkeepBatches }
    public var roundTripsPerFree: Double { frees == 0 ? 0 : Double(freeBatches) / Double(frees) }

    mutating func recordAllocation(_ trace: OperationTrace) {
        recordEvents(trace)
        allocations += 1
        casRetries += trace.retries
        casRetriesOnPendingLog += trace.pendingLosses
        casRetriesMax = max(casRetriesMax, trace.retries)
        let bucket = Self.retryBucketBounds.firstIndex { trace.retries <= $0 } ?? Self.retryBucketBounds.count
        retryHistogram[bucket] += 1
        allocationBatches += trace.batches
        allocationVerbs += trace.verbs
        recordAnswer(trace)
    }

    /// An `outOfMemory` answer (also a failed allocation).
    mutating func recordOutOfMemory(_ trace: OperationTrace) {
        recordFailedAllocation(trace)
        outOfMemoryAnswers += 1
        outOfMemoryBatches += trace.batches
        outOfMemoryRetries += trace.retries
        outOfMemoryRetriesMax = max(outOfMemoryRetriesMax, trace.retries)
        recordAnswer(trace)
    }

    private mutating func recordAnswer(_ trace: OperationTrace) {
        answerRoundTrips[Int(min(trace.batches, UInt64(Self.answerRoundTripsBuckets - 1)))] += 1
        answerRoundTripsMax = max(answerRoundTripsMax, trace.batches)
    }

    /// The round trips within which `fraction` of the answers came (the last bucket
    /// stands for "more than 63").
    public func answerRoundTrips(percentile fraction: Double) -> Int {
        let total = answerRoundTrips.reduce(0, +)
        guard total > 0 else { return 0 }
        let wanted = UInt64((Double(total) * fraction).rounded(.up))
        var seen: UInt64 = 0
        for (roundTrips, count) in answerRoundTrips.enumerated() {
            seen += count
            if seen >= wanted { return roundTrips }
        }
        return answerRoundTrips.count - 1
    }

    mutating func recordFree(_ trace: OperationTrace) {
        recordEvents(trace)
        frees += 1
        freeBatches += trace.batches
        freeVerbs += trace.verbs
    }

    /// Upkeep after the answer: log flushes, span and section state.
    mutating func recordUpkeep(_ trace: OperationTrace) {
        recordEvents(trace)
        upkeepBatches += trace.batches
        upkeepVerbs += trace.verbs
    }

    mutating func recordFailedAllocation(_ trace: OperationTrace) {
        recordEvents(trace)
        failedAllocations += 1
    }

    mutating func recordFailedFree(_ trace: OperationTrace) {
        recordEvents(trace)
        failedFrees += 1
    }

    private mutating func recordEvents(_ trace: OperationTrace) {
        assert(trace.effects.isEmpty, "an operation ended with effects of its link calls not taken: \(trace.effects)")
        refreshes += trace.refreshes
        refreshesShared += trace.refreshesShared
        summaryRefreshes += trace.summaryRefreshes
        refreshBytes += trace.refreshBytes
        summarySyncs += trace.summarySyncs
        summarySyncsAbandoned += trace.summarySyncsAbandoned
        spansOpened += trace.spansOpened
        spansClosed += trace.spansClosed
        flushRounds += trace.flushRounds
        upkeepErrors += trace.upkeepErrors
    }

    public static func + (lhs: AllocatorStatistics, rhs: AllocatorStatistics) -> AllocatorStatistics {
        var sum = lhs
        sum.allocations += rhs.allocations
        sum.frees += rhs.frees
        sum.failedAllocations += rhs.failedAllocations
        sum.failedFrees += rhs.failedFrees
        sum.casRetries += rhs.casRetries
        sum.casRetriesOnPendingLog += rhs.casRetriesOnPendingLog
        sum.casRetriesMax = max(sum.casRetriesMax, rhs.casRetriesMax)
        for bucket in sum.retryHistogram.indices { sum.retryHistogram[bucket] += rhs.retryHistogram[bucket] }
        for bucket in sum.answerRoundTrips.indices { sum.answerRoundTrips[bucket] += rhs.answerRoundTrips[bucket] }
        sum.answerRoundTripsMax = max(sum.answerRoundTripsMax, rhs.answerRoundTripsMax)
        sum.outOfMemoryAnswers += rhs.outOfMemoryAnswers
        sum.outOfMemoryBatches += rhs.outOfMemoryBatches
        sum.outOfMemoryRetries += rhs.outOfMemoryRetries
        sum.outOfMemoryRetriesMax = max(sum.outOfMemoryRetriesMax, rhs.outOfMemoryRetriesMax)
        sum.allocationBatches += rhs.allocationBatches
        sum.allocationVerbs += rhs.allocationVerbs
        sum.freeBatches += rhs.freeBatches
        sum.freeVerbs += rhs.freeVerbs
        sum.upkeepBatches += rhs.upkeepBatches
        sum.upkeepVerbs += rhs.upkeepVerbs
        sum.spansOpened += rhs.spansOpened
        sum.spansClosed += rhs.spansClosed
        sum.refreshes += rhs.refreshes
        sum.refreshesShared += rhs.refreshesShared
        sum.summaryRefreshes += rhs.summaryRefreshes
        sum.refreshBytes += rhs.refreshBytes
        sum.summarySyncs += rhs.summarySyncs
        sum.summarySyncsAbandoned += rhs.summarySyncsAbandoned
        sum.flushRounds += rhs.flushRounds
        sum.upkeepErrors += rhs.upkeepErrors
        return sum
    }
}
