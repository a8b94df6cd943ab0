#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The monotonic clock in nanoseconds.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// CPU time used by every thread of the process so far, in nanoseconds: what a benchmark
/// reports next to wall time on a shared machine, where the wall clock also counts the
/// time other processes had the CPUs.
package func processCPUNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

#if os(Linux)

/// Wakes sleeping tasks at their deadlines from one thread of its own, with no heap
/// allocation per sleep: a task parks on a continuation (which lives in the task's own
/// frame) in a min-heap of deadlines, and the thread resumes it when the monotonic clock
/// passes its deadline. `Task.sleep` costs four heap allocations and a timer source per
/// call; the upkeep workers' idle rounds and every backoff pause of real time go through
/// here instead. A pause wakes late by the kernel's timer slack (50 us by default), which
/// is why pauses of a few microseconds yield instead (`SystemRuntime.sleep`).
final class DeadlineSleeper: @unchecked Sendable {
    static let shared = DeadlineSleeper()

    private struct Sleeper {
        var deadline: UInt64
        var continuation: UnsafeContinuation<Void, Never>
    }

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    /// A binary min-heap by deadline, guarded by `mutex`. Its capacity only grows.
    private var sleepers: [Sleeper] = []
    /// The thread's list of sleepers to resume, kept between rounds (no allocation).
    private var due: [UnsafeContinuation<Void, Never>] = []

    private init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        precondition(pthread_mutex_init(mutex, nil) == 0, "pthread_mutex_init failed")
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        precondition(pthread_cond_init(condition, &attributes) == 0, "pthread_cond_init failed")
        pthread_condattr_destroy(&attributes)
        sleepers.reserveCapacity(1024)
        due.reserveCapacity(1024)
        var thread = pthread_t()
        let status = pthread_create(&thread, nil, { argument in
            Unmanaged<DeadlineSleeper>.fromOpaque(argument!).takeUnretainedValue().run()
        }, Unmanaged.passRetained(self).toOpaque())
        precondition(status == 0, "pthread_create failed: \(status)")
        pthread_detach(thread)
    }

    /// Suspends the current task until the monotonic clock reads `deadline` (ns).
    func sleep(until deadline: UInt64) async {
        await withUnsafeContinuation { continuation in
            pthread_mutex_lock(mutex)
            push(Sleeper(deadline: deadline, continuation: continuation))
            let earliest = sleepers[0].deadline == deadline
            pthread_mutex_unlock(mutex)
            if earliest { pthread_cond_signal(condition) }
        }
    }

    private func run() -> Never {
        pthread_mutex_lock(mutex)
        while true {
            let now = monotonicNanoseconds()
            while let head = sleepers.first, head.deadline <= now { due.append(popFirst().continuation) }
            if !due.isEmpty {
                pthread_mutex_unlock(mutex)
                for continuation in due { continuation.resume() }
                due.removeAll(keepingCapacity: true)
                pthread_mutex_lock(mutex)
                continue
            }
            if let head = sleepers.first {
                var wake = timespec(tv_sec: Int(head.deadline / 1_000_000_000), tv_nsec: Int(head.deadline % 1_000_000_000))
                pthread_cond_timedwait(condition, mutex, &wake)
            } else {
                pthread_cond_wait(condition, mutex)
            }
        }
    }

    // MARK: The heap

    private func push(_ sleeper: Sleeper) {
        sleepers.append(sleeper)
        var child = sleepers.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard sleepers[child].deadline < sleepers[parent].deadline else { break }
            sleepers.swapAt(child, parent)
            child = parent
        }
    }

    private func popFirst() -> Sleeper {
        let first = sleepers[0]
        let last = sleepers.removeLast()
        guard !sleepers.isEmpty else { return first }
        sleepers[0] = last
        var parent = 0
        while true {
            let left = 2 * parent + 1
            guard left < sleepers.count else { break }
            let right = left + 1
            let child = right < sleepers.count && sleepers[right].deadline < sleepers[left].deadline ? right : left
            guard sleepers[child].deadline < sleepers[parent].deadline else { break }
            sleepers.swapAt(child, parent)
            parent = child
        }
        return first
    }
}
#endif
