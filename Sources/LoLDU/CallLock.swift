import Glibc
import Synchronization

/// The lock an adapter's compute calls hold, one call at a time, that survives `fork()`: in the
/// child of a fork made while another thread was inside a call, that thread does not exist and
/// the lock would stay held for ever (a futex-based `Mutex` traps on it instead). The child's
/// first call finds it so and refuses, so the process neither blocks nor dies; an adapter that
/// was idle at the fork works in the child as in the parent.
struct CallLock: ~Copyable {
    /// How many forks this process descends from since the first lock was made (bumped in the
    /// child, where only the forking thread runs).
    private static let forks = Atomic<UInt>(0)
    private static let watchingForks: Bool = pthread_atfork(nil, nil, { _ = CallLock.forks.add(1, ordering: .relaxed) }) == 0

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// `forks` when this lock was last known to be free of threads the process does not have.
    private let checked: Atomic<UInt>

    init() {
        _ = Self.watchingForks
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        checked = Atomic(Self.forks.load(ordering: .relaxed))
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` holding the lock; `LoLDUError(.state)` in the child of a fork made while a
    /// call held it.
    func run(_ body: () throws(LoLDUError) -> Void) throws(LoLDUError) {
        let forks = Self.forks.load(ordering: .relaxed)
        if checked.load(ordering: .acquiring) != forks {  // the first call since a fork
            if pthread_mutex_trylock(mutex) == 0 {
                checked.store(forks, ordering: .releasing)
                pthread_mutex_unlock(mutex)
            } else if checked.load(ordering: .acquiring) != forks {  // (not another thread of this process checking it)
                throw LoLDUError(.state, "the adapter was inside a call on another thread when this process was forked; that thread does not exist here, so the adapter cannot be used in this process: create or load it again here (objects made before a fork() work in the child only if no call was running)")
            }
        }
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        try body()
    }
}
