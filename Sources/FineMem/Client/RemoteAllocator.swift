/// The allocator an application uses: `allocate(bytes:)` returns a `RemoteBuffer` on some
/// memory node, `free` returns it, `read` and `write` move data between the buffer and
/// local memory.
///
/// Requests round up to the next power of two times 4 KiB. An allocator speaks for one
/// application of one compute node: it cannot free, or turn pointers into, another
/// application's buffers, and it never hands out keys to metadata.
///
/// ```swift
/// let cluster = try await EmbeddedCluster.start()
/// let allocator = try cluster.makeAllocator()
/// let buffer = try await allocator.allocate(bytes: 10_000)      // a 16 KiB buffer
/// try await allocator.write(Array("hello".utf8), to: buffer)
/// let bytes = try await allocator.read(buffer, offset: 0, length: 5)
/// try await allocator.free(buffer)
/// ```
public struct RemoteAllocator: Sendable {
    /// The application this allocator allocates for.
    public let application: ApplicationID
    let blocks: BlockAllocator

    init(application: ApplicationID, blocks: BlockAllocator) {
        self.application = application
        self.blocks = blocks
    }

    /// Allocates a buffer of at least `bytes` bytes.
    public func allocate(bytes: Int) async throws(AllocationError) -> RemoteBuffer {
        guard bytes > 0 else { throw .zeroSize }
        let block = try await blocks.allocate(chunkCountLog2: Block.chunkCountLog2(forBytes: UInt64(bytes)), application: application)
        return try buffer(for: block)
    }

    /// Frees a buffer this allocator returned. Freeing anything else (another
    /// application's buffer, a part of a buffer, a buffer twice) is a typed error that
    /// changes nothing.
    public func free(_ buffer: RemoteBuffer) async throws(AllocationError) {
        try await blocks.free(block(for: buffer), application: application)
    }

    /// The buffer this application holds that starts at `pointer`.
    public func buffer(at pointer: RemotePointer) throws(AllocationError) -> RemoteBuffer {
        try buffer(for: blocks.heldBlock(at: pointer, application: application))
    }

    /// Writes `bytes` into the buffer at `offset`.
    public func write(_ bytes: some Collection<UInt8>, to buffer: RemoteBuffer, at offset: Int = 0) async throws(AllocationError) {
        try check(offset: offset, length: bytes.count, in: buffer)
        try await writeChecked(Array(bytes), to: buffer, at: offset)
    }

    /// Writes the bytes of `source` into the buffer at `offset`. `source` must stay valid
    /// until this returns; on the simulated NIC the bytes are copied with no allocation.
    public func write(from source: UnsafeRawBufferPointer, to buffer: RemoteBuffer, at offset: Int = 0) async throws(AllocationError) {
        try check(offset: offset, length: source.count, in: buffer)
        let link = try blocks.link(to: buffer.memoryNode)
        do { try await link.connection(lane: Int(application.rawValue)).write(buffer.address + UInt64(offset), rkey: buffer.rkey, from: source) } catch {
            throw .fabric(error)
        }
    }

    /// Reads `length` bytes of the buffer at `offset`.
    public func read(_ buffer: RemoteBuffer, offset: Int = 0, length: Int) async throws(AllocationError) -> [UInt8] {
        try check(offset: offset, length: length, in: buffer)
        let link = try blocks.link(to: buffer.memoryNode)
        do { return try await link.connection(lane: Int(application.rawValue)).read(buffer.address + UInt64(offset), length: length, rkey: buffer.rkey) } catch {
            throw .fabric(error)
        }
    }

    /// Reads `destination.count` bytes of the buffer at `offset` into `destination`, which
    /// must stay valid until this returns; on the simulated NIC the bytes are copied with
    /// no allocation.
    public func read(_ buffer: RemoteBuffer, offset: Int = 0, into destination: UnsafeMutableRawBufferPointer) async throws(AllocationError) {
        try check(offset: offset, length: destination.count, in: buffer)
        let link = try blocks.link(to: buffer.memoryNode)
        do { try await link.connection(lane: Int(application.rawValue)).read(buffer.address + UInt64(offset), rkey: buffer.rkey, into: destination) } catch {
            throw .fabric(error)
        }
    }

    /// Counters of this allocator's compute node (all its applications).
    public var statistics: AllocatorStatistics { blocks.statistics }

    // MARK: Buffers and blocks

    /// The buffer of `block`.
    func buffer(for block: Block) throws(AllocationError) -> RemoteBuffer {
        let link = try blocks.link(to: block.memoryNode)
        return RemoteBuffer(memoryNode: block.memoryNode, address: link.grant.dataAddress(chunk: block.firstChunk), length: Int(block.bytes), rkey: link.grant.dataKey)
    }

    /// The block a buffer names, or why it names none.
    func block(for buffer: RemoteBuffer) throws(AllocationError) -> Block {
        let link = try blocks.link(to: buffer.memoryNode)
        // An address beyond 48 bits is in no pool; the error shows its low 48 bits.
        let pointer = RemotePointer(rawValue: UInt64(buffer.memoryNode.rawValue) << 48 | buffer.address.rawValue & RemotePointer.addressMask)
        guard buffer.length > 0, buffer.length.nonzeroBitCount == 1, UInt64(buffer.length) % PoolGeometry.chunkBytes == 0,
              buffer.address.rawValue <= RemotePointer.addressMask, let chunk = link.grant.chunk(startingAt: buffer.address)
        else { throw .notABlockStart(pointer) }
        let block = Block(memoryNode: buffer.memoryNode, firstChunk: chunk, chunkCountLog2: Block.chunkCountLog2(forBytes: UInt64(buffer.length)))
        guard block.fits(link.geometry) else { throw .notABlockStart(pointer) }
        return block
    }

    private func writeChecked(_ bytes: [UInt8], to buffer: RemoteBuffer, at offset: Int) async throws(AllocationError) {
        let link = try blocks.link(to: buffer.memoryNode)
        do { try await link.connection(lane: Int(application.rawValue)).write(buffer.address + UInt64(offset), bytes: bytes, rkey: buffer.rkey) } catch {
            throw .fabric(error)
        }
    }

    private func check(offset: Int, length: Int, in buffer: RemoteBuffer) throws(AllocationError) {
        guard offset >= 0, length > 0, offset <= buffer.length, length <= buffer.length - offset else {
            throw .outOfBounds(offset: offset, length: length, bufferLength: buffer.length)
        }
    }
}
