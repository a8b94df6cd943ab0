/// What a compute node keeps about one memory node: its connection and grant, a cache of
/// the header words, and its own pending logs there.
final class MemoryNodeState<Connection: FabricConnection>: Sendable {
    let index: Int
    let grant: MemoryNodeGrant
    let connection: Connection
    let cache: Locked<HeaderCache>
    let pending = Locked(PendingLogTable())

    var geometry: PoolGeometry { grant.geometry }
    var metadataKey: RKey { grant.metadataKey }

    init(index: Int, grant: MemoryNodeGrant, connection: Connection, owner: OwnerID) {
        self.index = index
        self.grant = grant
        self.connection = connection
        let sections = grant.geometry.sectionCount
        cache = Locked(HeaderCache(sectionCount: sections, cursor: Int(owner.rawValue) * 7_919 % sections))
    }

    func sectionAddress(_ section: Int) -> RemoteAddress { grant.address(geometry.sectionHeaderOffset(section)) }
    func spanAddress(_ section: Int, _ span: Int) -> RemoteAddress {
        grant.address(geometry.spanHeaderOffset(section: section, span: span))
    }
    func recordAddress(_ chunk: Int) -> RemoteAddress { grant.address(geometry.fullLogOffset(chunk: chunk)) }
    func intentAddress(_ owner: OwnerID, _ slot: Int) -> RemoteAddress { grant.address(geometry.intentOffset(owner: owner, slot: slot)) }
    func dataAddress(_ chunk: Int) -> RemoteAddress { grant.address(geometry.dataOffset(chunk: chunk)) }
}

/// Cached header words of one memory node, refreshed from READs and from the answers of
/// failed CASes. `busy` holds headers with a CAS of this node in flight, so that tasks of
/// one compute node do not race each other for the same word.
struct HeaderCache: Sendable {
    var sections: [UInt64]
    var spans: [UInt64]
    var spansKnown: [Bool]
    var busy: Set<RemoteAddress> = []
    var cursor: Int

    init(sectionCount: Int, cursor: Int) {
        sections = Array(repeating: SectionHeader.empty.rawValue, count: sectionCount)
        spans = Array(repeating: SpanHeader.empty.rawValue, count: sectionCount * SectionHeader.spanCount)
        spansKnown = Array(repeating: false, count: sectionCount)
        self.cursor = cursor
    }

    func span(_ section: Int, _ span: Int) -> UInt64 { spans[section * SectionHeader.spanCount + span] }
    mutating func setSpan(_ section: Int, _ span: Int, _ word: UInt64) { spans[section * SectionHeader.spanCount + span] = word }

    /// The header as it will be once a pending log is flushed: what searches look at.
    static func settled<Header: LoggedHeader>(_ type: Header.Type, _ word: UInt64) -> Header? {
        guard let header = Header(rawValue: word) else { return nil }
        return header.logPending ? header.flushed() : header
    }
}
