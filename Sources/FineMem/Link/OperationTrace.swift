/// What one operation (an allocation, a free, or one piece of upkeep) spent: batches and
/// verbs posted, CAS failures, search attempts, and the structural events it caused.
package struct OperationTrace: Sendable, Equatable {
    /// Which of a memory node link's connections the operation posts on
    /// (`MemoryNodeLink.connection(for:)`): an allocation's or a free's application number
    /// (as its home shard), `upkeepLane` for everything else.
    package var lane = Self.upkeepLane

    package init(lane: Int = Self.upkeepLane) { self.lane = lane }

    package static let upkeepLane = -1
    /// Batches posted: one doorbell, one network round trip each.
    package var batches: UInt64 = 0
    package var verbs: UInt64 = 0
    /// Compare-and-swaps that did not exchange.
    package var retries: UInt64 = 0
    /// The part of `retries` lost to a pending log rather than to another commit.
    package var pendingLosses: UInt64 = 0
    /// Choices the search made and spent (a lost commit, a transition that no longer
    /// applied); bounded by `AllocatorConfiguration.operationAttemptsMax`.
    package var attempts = 0
    /// Full re-reads of a memory node's headers.
    package var refreshes: UInt64 = 0
    /// Refreshes this operation wanted and took from another task's read in flight.
    package var refreshesShared: UInt64 = 0
    /// Looks through the room summary (`MemoryNodeLink.refreshFromSummary`).
    package var summaryRefreshes: UInt64 = 0
    /// Bytes read by refreshes, full or through the summary.
    package var refreshBytes: UInt64 = 0
    /// Syncs of room summary bits after a section's room changed.
    package var summarySyncs: UInt64 = 0
    /// Room summary syncs given up after `MemoryNodeLink.roomSummarySyncRoundsMax` rounds.
    package var summarySyncsAbandoned: UInt64 = 0
    package var spansOpened: UInt64 = 0
    package var spansClosed: UInt64 = 0
    /// Rounds a flush waited out (with backoff) because its header kept changing.
    package var flushRounds: UInt64 = 0
    /// Background upkeep that ended in an error (a fabric error, or a metadata word the
    /// protocol does not allow).
    /// What the link's calls left for the caller to do (`LinkEffects`): taken by the
    /// owner after each call; an operation ends with none.
    package var effects = LinkEffects()
    package var upkeepErrors: UInt64 = 0
}

/// What a link's calls leave for their caller to do, read from the trace after each call
/// (`OperationTrace.effects`): the link only answers, and its owner acts.
package struct LinkEffects: Sendable, Equatable {
    /// Sections whose room (`SectionHeader.hasRoom`) a committed CAS changed, or whose room
    /// summary bits a full refresh found stale: their bits must be synced
    /// (`MemoryNodeLink.syncRoomSummary`).
    package var roomChanged: Range<Int>?
    /// Headers with a log of this node that an operation took to fold into its commit, or
    /// a flush took, and gave back undone: each must still be flushed.
    package var returnedLogs: [HeaderSlot] = []

    package var isEmpty: Bool { roomChanged == nil && returnedLogs.isEmpty }

    package mutating func noteRoomChanged(_ sections: Range<Int>) {
        roomChanged = roomChanged.map { min($0.lowerBound, sections.lowerBound)..<max($0.upperBound, sections.upperBound) } ?? sections
    }

    /// Answers the effects and leaves none.
    package mutating func take() -> LinkEffects {
        defer { self = LinkEffects() }
        return self
    }
}
