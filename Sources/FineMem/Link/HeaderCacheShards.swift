/// A compute node's header cache of one memory node, in shards of consecutive sections,
/// each a `HeaderCache` under a lock of its own, with its own cursor, busy marks and
/// pending logs: tasks on different CPUs search and commit in different shards and share
/// no lock and no cache line (LLFree's per-core trees, for a compute node's tasks).
///
/// An operation on one header locks the shard that holds it. A search starts in the
/// shard of its application (the application number modulo the shards: each
/// `RemoteAllocator` of a node has its own, as each task of the demo and the benchmarks
/// does; tasks of one application share theirs) and goes on to the others
/// (`MemoryNodeLink.choose`). The application, not the CPU: a task stays in its shard
/// when its thread migrates or it resumes on another thread after a verb. A run of
/// sections locks every shard, in order (`withEveryShardLocked`), and nothing else takes
/// two shard locks, so shards never deadlock.
final class HeaderCacheShards: Sendable {
    private let stripes: LockedStripes<HeaderCache>
    /// Sections per shard (the last one may hold fewer).
    private let sectionsPerShard: Int
    /// The sections of the pool.
    let sectionCount: Int

    /// The cache of a pool whose section headers read `sections`, in at most `shards`
    /// shards of at least `sectionsPerShardMin` sections, searches starting in each at
    /// the fraction `start / 2^64` of its sections.
    init(sections: [UInt64], shards wanted: Int, sectionsPerShardMin: Int = 4, start: UInt64) {
        precondition(!sections.isEmpty, "a pool has at least one section")
        sectionCount = sections.count
        let most = max(1, sections.count / max(1, sectionsPerShardMin))
        let shards = min(max(1, wanted), most)
        let per = (sections.count + shards - 1) / shards
        sectionsPerShard = per
        stripes = LockedStripes(count: (sections.count + per - 1) / per) { index in
            let range = index * per..<min((index + 1) * per, sections.count)
            let offset = Int(start.multipliedFullWidth(by: UInt64(range.count)).high)
            return HeaderCache(sections: Array(sections[range]), base: range.lowerBound, cursor: range.lowerBound + offset)
        }
    }

    /// How many shards.
    var count: Int { stripes.count }

    /// The shard that holds `section`.
    func shard(of section: Int) -> Int { section / sectionsPerShard }

    /// Runs `body` on shard `index`, under its lock.
    @inline(__always)
    func withShard<Result, Failure: Error>(_ index: Int, _ body: (inout HeaderCache) throws(Failure) -> Result) throws(Failure) -> Result {
        try stripes.withLock(index, body)
    }

    /// Runs `body` on the shard that holds `slot`, under its lock.
    @inline(__always)
    func withShard<Result, Failure: Error>(of slot: HeaderSlot, _ body: (inout HeaderCache) throws(Failure) -> Result) throws(Failure) -> Result {
        try stripes.withLock(shard(of: slot.section), body)
    }

    /// Runs `body` on every shard in turn, each under its own lock (not all at once).
    func forEachShard(_ body: (inout HeaderCache) -> Void) {
        for index in 0..<count { stripes.withLock(index, body) }
    }

    /// Runs `body` with every shard locked.
    func withEveryShardLocked<Result>(_ body: (inout EveryShard) -> Result) -> Result {
        stripes.withEveryLock {
            var every = EveryShard(shards: self)
            return body(&every)
        }
    }

    /// The whole cache, every shard locked: what a search for a run of sections sees.
    struct EveryShard {
        fileprivate let shards: HeaderCacheShards

        var sectionCount: Int { shards.sectionCount }

        private func shard(_ slot: HeaderSlot) -> UnsafeMutablePointer<HeaderCache> { shards.stripes.value(shards.shard(of: slot.section)) }

        subscript(slot: HeaderSlot) -> UInt64 { shard(slot).pointee[slot] }

        func isBusy(_ slot: HeaderSlot) -> Bool { shard(slot).pointee.busy.contains(slot) }

        mutating func markBusy(_ slot: HeaderSlot) { shard(slot).pointee.busy.insert(slot) }

        /// Ends the turns of other nodes whose time is up by `now`, in every shard.
        mutating func endTurns(through now: UInt64) {
            for index in 0..<shards.count where shards.stripes.value(index).pointee.busy.hasTurns {
                shards.stripes.value(index).pointee.busy.endTurns(through: now)
            }
        }
    }
}

extension HeaderCacheShards {
    /// Where `owner`'s searches start, as a fraction of the sections (of 2^64): owner
    /// times the golden ratio, modulo 1 (Fibonacci hashing). Any number of consecutive
    /// owners lie apart on the circle by gaps of at most three lengths, the largest at
    /// most the golden ratio squared (about 2.62) times the smallest, whatever the pool's
    /// size (in whole sections, gaps of up to one section more), so that compute nodes filling
    /// a pool begin in different places and meet late. (Owner times a constant modulo the
    /// section count would not: for some pool sizes the constant is -1 modulo the count,
    /// and consecutive owners start on adjacent sections and race for every section.)
    static func start(of owner: OwnerID) -> UInt64 { UInt64(owner.rawValue) &* 0x9E37_79B9_7F4A_7C15 }
}
