#if canImport(Glibc)
import Glibc
#endif
import CVerbs
import Testing
@testable import FineMem
import FineMemHarness

/// The device the hardware suite runs on, from `FINEMEM_RDMA_DEVICE`; nil without one.
private let rdmaDevice: String? = getenv("FINEMEM_RDMA_DEVICE").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }

/// Whether this machine has RDMA devices at all (the hosts of this project have none).
private let hostHasRDMA = access("/dev/infiniband", F_OK) == 0

@Suite("Verbs backend without a device")
struct VerbsNoDeviceTests {
    @Test("no RDMA device is an empty list, never a crash", .enabled(if: !hostHasRDMA, "this host has /dev/infiniband"))
    func noDevices() throws {
        #expect(try VerbsDevices.list().isEmpty)
    }

    @Test("opening a missing device, a verbs NIC and a verbs cluster fail with a precise error", .enabled(if: !hostHasRDMA, "this host has /dev/infiniband"))
    func missingDevice() async throws {
        #expect(throws: VerbsError.self) { try VerbsContext(device: "rxe0") }
        do {
            _ = try VerbsNIC(device: "rxe0", node: NodeID(0), poolBytes: 1 << 20, windows: 0, regions: 4, log: { _ in })
            Issue.record("a verbs NIC opened without a device")
        } catch {
            guard case .device(let why) = error else { Issue.record("wrong error \(error)"); return }
            #expect(why.contains("rxe0"))
        }
        do {
            _ = try await EmbeddedCluster.start(.init(poolBytesPerNode: 16 << 20, fabric: .verbs(device: "rxe0")))
            Issue.record("a verbs cluster started without a device")
        } catch {
            guard case .memoryNodeFailed(NodeID(0), let reason) = error else { Issue.record("wrong error \(error)"); return }
            #expect(reason.contains("rxe0"))
        }
    }

    @Test("a simulator runs only on the simulated fabric")
    func simulatorNeedsSimulatedFabric() async {
        let simulator = Simulator(seed: 1, latency: LatencyModel())
        let outcome = Locked<String?>(nil)
        simulator.spawn {
            do {
                _ = try await EmbeddedCluster.start(.init(poolBytesPerNode: 16 << 20, fabric: .verbs(device: "rxe0")), simulator: simulator)
                outcome.withLock { $0 = "started" }
            } catch {
                outcome.withLock { $0 = "\(error)" }
            }
        }
        simulator.run()
        #expect(outcome.withLock { $0 }?.contains("a simulator runs only on the simulated fabric") == true)
    }
}

@Suite("Verbs work-completion status to fabric error")
struct VerbsErrorMappingTests {
    let remote = NodeID(3)
    let key = RKey(rawValue: 0x1234_5601)

    @Test("every status maps to its typed error", arguments: [
        (IBV_WC_REM_ACCESS_ERR, "remoteAccess(accessRefused)"),
        (IBV_WC_REM_INV_REQ_ERR, "remoteAccess(invalidRequest)"),
        (IBV_WC_REM_OP_ERR, "remoteAccess(remoteOperationFailed)"),
        (IBV_WC_RETRY_EXC_ERR, "peerDead"),
        (IBV_WC_RNR_RETRY_EXC_ERR, "peerDead"),
        (IBV_WC_RESP_TIMEOUT_ERR, "peerDead"),
        (IBV_WC_WR_FLUSH_ERR, "connectionBroken"),
        (IBV_WC_LOC_PROT_ERR, "localNIC"),
        (IBV_WC_LOC_LEN_ERR, "localNIC"),
        (IBV_WC_LOC_QP_OP_ERR, "localNIC"),
        (IBV_WC_MW_BIND_ERR, "localNIC"),
        (IBV_WC_BAD_RESP_ERR, "localNIC"),
        (IBV_WC_FATAL_ERR, "localNIC"),
        (IBV_WC_GENERAL_ERR, "localNIC"),
    ])
    func mapping(status: ibv_wc_status, expected: String) {
        let verb = Verb.read(RemoteAddress(0x1000), length: 8, rkey: key)
        let error = verbsFabricError(status: status, verb: verb, index: 2, remote: remote)
        switch error {
        case .remoteAccess(let violation, let address, let rkey, let index):
            #expect(expected == "remoteAccess(\(violation == .accessRefused ? "accessRefused" : violation == .invalidRequest ? "invalidRequest" : violation == .remoteOperationFailed ? "remoteOperationFailed" : "\(violation)"))")
            #expect(address == RemoteAddress(0x1000) && rkey == key && index == 2)
        case .peerDead(let node):
            #expect(expected == "peerDead" && node == remote)
        case .connectionBroken(let node):
            #expect(expected == "connectionBroken" && node == remote)
        case .localNIC(let name, let index):
            #expect(expected == "localNIC" && index == 2)
            #expect(name.contains("(\(status.rawValue))"))
        case .localCrash:
            Issue.record("a verbs completion never maps to a local crash")
        }
    }

    @Test("a misaligned atomic refused as an invalid request is reported as misaligned")
    func misalignedAtomic() {
        let cas = Verb.compareAndSwap(RemoteAddress(0x1004), expected: 0, desired: 1, rkey: key)
        #expect(verbsFabricError(status: IBV_WC_REM_INV_REQ_ERR, verb: cas, index: 0, remote: remote)
            == .remoteAccess(.misalignedAtomic, address: RemoteAddress(0x1004), rkey: key, verbIndex: 0))
        let aligned = Verb.fetchAndAdd(RemoteAddress(0x1008), delta: 1, rkey: key)
        #expect(verbsFabricError(status: IBV_WC_REM_INV_REQ_ERR, verb: aligned, index: 0, remote: remote)
            == .remoteAccess(.invalidRequest, address: RemoteAddress(0x1008), rkey: key, verbIndex: 0))
    }
}

@Suite("Verbs work-request construction")
struct VerbsWorkRequestTests {
    let key = RKey(rawValue: 0xabcd_ef02)
    let slab: UInt64 = 0x7f00_0000_1000
    let lkey: UInt32 = 0x77

    var verbs: [Verb] {
        [
            .read(RemoteAddress(0x10_0000), length: 13, rkey: key),
            .write(RemoteAddress(0x10_0040), bytes: [1, 2, 3], rkey: key).fenced(),
            .compareAndSwap(RemoteAddress(0x10_0080), expected: 5, desired: 0x0102_0304_0506_0708, rkey: key),
            .fetchAndAdd(RemoteAddress(0x10_0088), delta: 9, rkey: RKey(rawValue: 3), fence: true),
        ]
    }

    @Test("slab offsets are 8-byte aligned, one region per verb")
    func layout() {
        let layout = VerbsSlabLayout(verbs[...])
        #expect(layout.offsets == [0, 16, 24, 32])
        #expect(layout.bytes == 40)
    }

    @Test("every field of every work request")
    func fields() {
        let chain = VerbsWorkRequestChain(capacity: 8)
        let layout = VerbsSlabLayout(verbs[...])
        chain.fill(verbs[...], layout: layout, slabAddress: slab, lkey: lkey)
        #expect(chain.count == 4)
        let wr = chain.requests
        let sge = chain.gatherEntries
        for i in 0..<4 {
            #expect(wr[i].wr_id == UInt64(i))
            #expect(wr[i].num_sge == 1)
            #expect(wr[i].sg_list == sge.baseAddress! + i)
            #expect(sge[i].lkey == lkey)
            #expect(sge[i].addr == slab + UInt64(layout.offsets[i]))
            #expect(wr[i].next == (i < 3 ? wr.baseAddress! + i + 1 : nil))
        }
        #expect(chain.head == wr.baseAddress!)
        #expect(sge.prefix(4).map(\.length) == [13, 3, 8, 8])

        #expect(wr[0].opcode == IBV_WR_RDMA_READ)
        #expect(wr[0].wr.rdma.remote_addr == 0x10_0000 && wr[0].wr.rdma.rkey == key.rawValue)
        #expect(wr[0].send_flags == 0)

        #expect(wr[1].opcode == IBV_WR_RDMA_WRITE)
        #expect(wr[1].wr.rdma.remote_addr == 0x10_0040 && wr[1].wr.rdma.rkey == key.rawValue)
        #expect(wr[1].send_flags == IBV_SEND_FENCE.rawValue)

        #expect(wr[2].opcode == IBV_WR_ATOMIC_CMP_AND_SWP)
        #expect(wr[2].wr.atomic.remote_addr == 0x10_0080 && wr[2].wr.atomic.rkey == key.rawValue)
        #expect(wr[2].wr.atomic.compare_add == 5 && wr[2].wr.atomic.swap == 0x0102_0304_0506_0708)
        #expect(wr[2].send_flags == 0)

        #expect(wr[3].opcode == IBV_WR_ATOMIC_FETCH_AND_ADD)
        #expect(wr[3].wr.atomic.remote_addr == 0x10_0088 && wr[3].wr.atomic.rkey == 3)
        #expect(wr[3].wr.atomic.compare_add == 9)
        #expect(wr[3].send_flags == IBV_SEND_FENCE.rawValue | IBV_SEND_SIGNALED.rawValue, "only the last request is signalled")
    }

    @Test("a chunk of a longer batch keeps the batch's indices as work-request ids")
    func chunk() {
        let chain = VerbsWorkRequestChain(capacity: 2)
        let slice = verbs[2..<4]
        chain.fill(slice, layout: VerbsSlabLayout(slice), slabAddress: slab, lkey: lkey)
        #expect(chain.count == 2)
        #expect(chain.requests[0].wr_id == 2 && chain.requests[1].wr_id == 3)
        #expect(chain.gatherEntries[0].addr == slab && chain.gatherEntries[1].addr == slab + 8)
        #expect(chain.requests[0].send_flags == 0)
        #expect(chain.requests[1].send_flags & IBV_SEND_SIGNALED.rawValue != 0)
        #expect(chain.requests[1].next == nil)
    }
}

@Suite("Verbs bootstrap and GID choice without a device")
struct VerbsBootstrapTests {
    @Test("the message survives the wire format")
    func roundTrip() throws {
        let message = VerbsBootstrapMessage(
            endpoint: VerbsEndpoint(queuePairNumber: 0x12_3456, lid: 7, gid: (0..<16).map { UInt8($0) }, packetSequenceNumber: 0xab_cdef),
            payload: [9, 8, 7])
        let bytes = message.encoded
        #expect(bytes.count == VerbsBootstrapMessage.headerBytes + 3)
        let decoded = VerbsBootstrapMessage.decodeHeader(Array(bytes.prefix(VerbsBootstrapMessage.headerBytes)))
        #expect(decoded?.0 == message.endpoint && decoded?.1 == 3)
        #expect(VerbsBootstrapMessage.decodeHeader(Array(repeating: 0, count: VerbsBootstrapMessage.headerBytes)) == nil)
    }

    @Test("two sides exchange endpoints and the grant over TCP")
    func exchange() throws {
        // One thread plays both sides in turn: the messages fit the sockets' buffers.
        let listener = try VerbsBootstrapListener(host: "127.0.0.1", port: 0)
        let clientChannel = try verbsBootstrapConnect(host: "127.0.0.1", port: listener.port)
        let serverChannel = try listener.accept(timeoutSeconds: 10)
        let client = VerbsBootstrapMessage(endpoint: VerbsEndpoint(queuePairNumber: 99, lid: 3, gid: Array(repeating: 1, count: 16), packetSequenceNumber: 77), payload: [])
        let server = VerbsBootstrapMessage(endpoint: VerbsEndpoint(queuePairNumber: 17, lid: 0, gid: Array(repeating: 0xfe, count: 16), packetSequenceNumber: 5), payload: Array("grant".utf8))
        try clientChannel.send(client, step: "send")
        #expect(try serverChannel.receive(timeoutSeconds: 10, step: "receive") == client)
        try serverChannel.send(server, timeoutSeconds: 10, step: "send")
        #expect(try clientChannel.receive(step: "receive") == server)
    }

    @Test("a failed step says which step")
    func errors() throws {
        #expect { _ = try verbsBootstrapConnect(host: "127.0.0.1", port: 1, timeoutSeconds: 2) } throws: { error in
            "\(error)".contains("connect to 127.0.0.1:1")
        }
        #expect { _ = try verbsBootstrapConnect(host: "not-an-address", port: 1) } throws: { error in
            "\(error)".contains("address not-an-address")
        }
        let listener = try VerbsBootstrapListener(host: "127.0.0.1", port: 0)
        #expect { _ = try listener.accept(timeoutSeconds: 0.2) } throws: { error in
            "\(error)".contains("no compute node connected")
        }
        let channel = try verbsBootstrapConnect(host: "127.0.0.1", port: listener.port)
        #expect { _ = try channel.receive(timeoutSeconds: 0.2, step: "receive the memory node's QP number") } throws: { error in
            "\(error)" == "bootstrap: receive the memory node's QP number: timed out"
        }
    }

    @Test("RoCE prefers a RoCE v2 IPv4-mapped GID, or an IPv6 one when asked; InfiniBand uses GID 0")
    func gidChoice() {
        let linkLocal: [UInt8] = [0xfe, 0x80] + Array(repeating: 0, count: 13) + [1]
        let mapped: [UInt8] = Array(repeating: 0, count: 10) + [0xff, 0xff, 10, 77, 0, 1]
        let gids = [
            VerbsGID(index: 0, raw: linkLocal, kind: .roceV1),
            VerbsGID(index: 1, raw: linkLocal, kind: .roceV2),
            VerbsGID(index: 2, raw: mapped, kind: .roceV1),
            VerbsGID(index: 3, raw: mapped, kind: .roceV2),
        ]
        let roce = VerbsPortInfo(number: 1, active: true, state: "PORT_ACTIVE", linkLayer: .ethernet, lid: 0, activeMTU: 1024, gids: gids)
        #expect(roce.preferredGID()?.index == 3)
        #expect(roce.preferredGID(preferIPv6: true)?.index == 1)
        #expect(gids[3].address == "::ffff:10.77.0.1")
        let v1Only = VerbsPortInfo(number: 1, active: true, state: "PORT_ACTIVE", linkLayer: .ethernet, lid: 0, activeMTU: 1024, gids: [gids[0], gids[2]])
        #expect(v1Only.preferredGID()?.index == 2)
        let ib = VerbsPortInfo(number: 1, active: true, state: "PORT_ACTIVE", linkLayer: .infiniband, lid: 5, activeMTU: 4096, gids: [VerbsGID(index: 0, raw: linkLocal, kind: .infiniband)])
        #expect(ib.preferredGID()?.index == 0)
    }
}

@Suite("Hardware suite on a real device")
struct HardwareSuiteTests {
    @Test("every check passes or is skipped with a reason", .enabled(if: rdmaDevice != nil, "FINEMEM_RDMA_DEVICE is not set: the hardware suite needs an RDMA device (run `finemem hardware-suite` in the Soft-RoCE VM)"))
    func suite() async {
        let results = await HardwareSuite(device: rdmaDevice!).run { _ in }
        for check in results {
            if case .failed(let reason) = check.outcome { Issue.record("\(check.name): \(reason)") }
        }
        #expect(!results.isEmpty)
    }
}
