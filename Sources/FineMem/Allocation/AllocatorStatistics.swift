/// Counters of one compute node's allocator.
public struct AllocatorStatistics: Sendable, Hashable {
    /// Upper bounds of the CAS-retry histogram buckets (the last bucket is open).
    public static let retryBucketBounds: [UInt64] = [0, 1, 2, 4, 8, 16, 32, 64]

    public var allocations: UInt64 = 0
    public var frees: UInt64 = 0
    public var failedAllocations: UInt64 = 0
    public var failedFrees: UInt64 = 0
    /// CAS failures summed over successful allocations.
    public var casRetries: UInt64 = 0
    /// The part of `casRetries` lost to a pending log (its flush had not landed yet), as
    /// opposed to another operation's commit.
    public var casRetriesOnPendingLog: UInt64 = 0
    public var casRetriesMax: UInt64 = 0
    /// Allocations by CAS failures: bucket i counts those with at most `retryBucketBounds[i]`
    /// (and more than the previous bound); the last bucket counts the rest.
    public var retryHistogram: [UInt64] = Array(repeating: 0, count: AllocatorStatistics.retryBucketBounds.count + 1)
    /// Batches (network round trips) and verbs posted before an allocation returned.
    public var allocationBatches: UInt64 = 0
    public var allocationVerbs: UInt64 = 0
    /// The same for frees.
    public var freeBatches: UInt64 = 0
    public var freeVerbs: UInt64 = 0
    /// Batches and verbs of upkeep after the answer (log flushes, span and section state).
    public var upkeepBatches: UInt64 = 0
    public var upkeepVerbs: UInt64 = 0
    /// Spans this node put into chunk mode, and spans it returned to their sections.
    public var spansOpened: UInt64 = 0
    public var spansClosed: UInt64 = 0
    /// Full re-reads of a memory node's headers (when the cache showed no room).
    public var refreshes: UInt64 = 0

    public init() {}

    public var casRetriesAverage: Double { allocations == 0 ? 0 : Double(casRetries) / Double(allocations) }
    public var roundTripsPerAllocation: Double { allocations == 0 ? 0 : Double(allocationBatches) / Double(allocations) }
    public var verbsPerAllocation: Double { allocations == 0 ? 0 : Double(allocationVerbs) / Double(allocations) }
    public var roundTripsPerFree: Double { frees == 0 ? 0 : Double(freeBatches) / Double(frees) }

    mutating func recordAllocation(_ trace: OperationTrace) {
        allocations += 1
        casRetries += trace.retries
        casRetriesOnPendingLog += trace.pendingLosses
        casRetriesMax = max(casRetriesMax, trace.retries)
        let bucket = Self.retryBucketBounds.firstIndex { trace.retries <= $0 } ?? Self.retryBucketBounds.count
        retryHistogram[bucket] += 1
        allocationBatches += trace.batches
        allocationVerbs += trace.verbs
    }

    mutating func recordFree(_ trace: OperationTrace) {
        frees += 1
        freeBatches += trace.batches
        freeVerbs += trace.verbs
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
        for i in sum.retryHistogram.indices { sum.retryHistogram[i] += rhs.retryHistogram[i] }
        sum.allocationBatches += rhs.allocationBatches
        sum.allocationVerbs += rhs.allocationVerbs
        sum.freeBatches += rhs.freeBatches
        sum.freeVerbs += rhs.freeVerbs
        sum.upkeepBatches += rhs.upkeepBatches
        sum.upkeepVerbs += rhs.upkeepVerbs
        sum.spansOpened += rhs.spansOpened
        sum.spansClosed += rhs.spansClosed
        sum.refreshes += rhs.refreshes
        return sum
    }
}

/// What one operation spent: batches and verbs posted, CAS failures, attempts.
struct OperationTrace: Sendable {
    var batches: UInt64 = 0
    var verbs: UInt64 = 0
    var retries: UInt64 = 0
    /// CAS failures caused by a pending log rather than by another commit.
    var pendingLosses: UInt64 = 0
    var attempts = 0
}
