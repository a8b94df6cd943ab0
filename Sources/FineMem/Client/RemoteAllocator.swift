/// The allocator an application uses: `allocate(bytes:)` returns a `RemoteBuffer` on some
/// memory node, `free` returns it, `read` and `write` move data.
///
/// Requests round up to the next power of two times 4 KiB. An allocator speaks for one
/// application of one compute node: it cannot free another application's buffers.
///
/// ```swift
/// let cluster = try await EmbeddedCluster.start()
/// let allocator = cluster.makeAllocator()
/// let buffer = try await allocator.allocate(bytes: 10_000)      // a 16 KiB buffer
/// try await allocator.write(Array("hello".utf8), to: buffer)
/// let bytes = try await allocator.read(buffer, offset: 0, length: 5)
/// try await allocator.free(buffer)
/// ```
public struct RemoteAllocator<Connection: FabricConnection>: Sendable {
    public let application: ApplicationID
    public let blocks: BlockAllocator<Connection>

    public init(application: ApplicationID, blocks: BlockAllocator<Connection>) {
        self.application = application
        self.blocks = blocks
    }

    /// Allocates a buffer of at least `bytes` bytes.
    public func allocate(bytes: Int) async throws(AllocationError) -> RemoteBuffer {
        guard bytes > 0 else { throw .zeroSize }
        let block = try await blocks.allocate(sizeLog2: Block.sizeLog2(forBytes: UInt64(bytes)), application: application)
        return buffer(for: block)
    }

    /// Frees a buffer this allocator returned.
    public func free(_ buffer: RemoteBuffer) async throws(AllocationError) {
        try await blocks.free(block(for: buffer), application: application)
    }

    /// Writes `bytes` into the buffer at `offset`.
    public func write(_ bytes: [UInt8], to buffer: RemoteBuffer, at offset: Int = 0) async throws(AllocationError) {
        try check(offset: offset, length: bytes.count, in: buffer)
        let connection = try connection(for: buffer)
        do { try await connection.write(buffer.address + UInt64(offset), bytes: bytes, rkey: buffer.rkey) } catch {
            throw .fabric(error)
        }
    }

    /// Reads `length` bytes of the buffer at `offset`.
    public func read(_ buffer: RemoteBuffer, offset: Int = 0, length: Int) async throws(AllocationError) -> [UInt8] {
        try check(offset: offset, length: length, in: buffer)
        let connection = try connection(for: buffer)
        do { return try await connection.read(buffer.address + UInt64(offset), length: length, rkey: buffer.rkey) } catch {
            throw .fabric(error)
        }
    }

    /// The buffer of `block`.
    public func buffer(for block: Block) -> RemoteBuffer {
        let node = blocks.nodes.first { $0.grant.memoryNode == block.memoryNode }!
        return RemoteBuffer(
            memoryNode: block.memoryNode, address: node.dataAddress(block.firstChunk), length: Int(block.bytes), rkey: node.grant.dataKey)
    }

    /// The block of a buffer, or why it is not one.
    public func block(for buffer: RemoteBuffer) throws(AllocationError) -> Block {
        guard let node = blocks.nodes.first(where: { $0.grant.memoryNode == buffer.memoryNode }) else {
            throw .unknownMemoryNode(buffer.memoryNode)
        }
        let geometry = node.geometry
        let notStart = AllocationError.notABlockStart(memoryNode: buffer.memoryNode, address: buffer.address)
        guard buffer.address >= node.grant.baseAddress, buffer.length > 0, buffer.length.nonzeroBitCount == 1,
              UInt64(buffer.length) % PoolGeometry.chunkBytes == 0,
              let chunk = geometry.chunk(atDataOffset: buffer.address - node.grant.baseAddress),
              geometry.dataOffset(chunk: chunk) == buffer.address - node.grant.baseAddress
        else { throw notStart }
        let block = Block(memoryNode: buffer.memoryNode, firstChunk: chunk, sizeLog2: Block.sizeLog2(forBytes: UInt64(buffer.length)))
        guard chunk % block.chunkCount == 0, block.chunks.upperBound <= geometry.chunkCount else { throw notStart }
        return block
    }

    private func connection(for buffer: RemoteBuffer) throws(AllocationError) -> Connection {
        guard let node = blocks.nodes.first(where: { $0.grant.memoryNode == buffer.memoryNode }) else {
            throw .unknownMemoryNode(buffer.memoryNode)
        }
        return node.connection
    }

    private func check(offset: Int, length: Int, in buffer: RemoteBuffer) throws(AllocationError) {
        guard offset >= 0, length > 0, offset <= buffer.length, length <= buffer.length - offset else {
            throw .outOfBounds(offset: offset, length: length, bufferLength: buffer.length)
        }
    }
}
