import Glibc
import Synchronization

/// The lock an adapter's compute calls hold, one call at a time, that survives `fork()`: in the
/// child of a fork made while another thread was inside a call, that thread does not exist and
/// the lock would stay held for ever (a futex-based `Mutex` traps on it instead). The child's
/// first call finds it so and refuses, so the process neither blocks nor dies; an adapter that
/// was idle at the fork works in the child as in the parent. The mutex is made on the first
/// call, so that adapters only ever used by grouped calls (which take no lock) hold 12 bytes.
struct CallLock: ~Copyable {
    private let mutex = Atomic<UnsafeMutablePointer<pthread_mutex_t>?>(nil)
    /// ``ProcessMutex/forks`` when this lock was last known to be free of threads the process
    /// does not have.
    private let checked: Atomic<UInt32>

    init() {
        ProcessMutex.watchForks()
        checked = Atomic(ProcessMutex.forks.load(ordering: .relaxed))
    }

    deinit {
        if let mutex = mutex.load(ordering: .acquiring) {
            pthread_mutex_destroy(mutex)
            free(mutex)
        }
    }

    /// Runs `body` holding the lock; `LoLDUError(.state)` in the child of a fork made while a
    /// call held it.
    func run(_ body: () throws(LoLDUError) -> Void) throws(LoLDUError) {
        let mutex = try made()
        try checkFork(mutex)
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        try body()
    }

    /// `LoLDUError(.state)` in the child of a fork made while a call held the lock, for the
    /// calls that do not take it (they must not overlap one that does, a fork included).
    func checkUsable() throws(LoLDUError) {
        guard let mutex = mutex.load(ordering: .acquiring) else { return }  // (never held)
        try checkFork(mutex)
    }

    private func checkFork(_ mutex: UnsafeMutablePointer<pthread_mutex_t>) throws(LoLDUError) {
        let forks = ProcessMutex.forks.load(ordering: .relaxed)
        if checked.load(ordering: .acquiring) != forks {  // the first call since a fork
            if pthread_mutex_trylock(mutex) == 0 {
                checked.store(forks, ordering: .releasing)
                pthread_mutex_unlock(mutex)
            } else if checked.load(ordering: .acquiring) != forks {  // (not another thread of this process checking it)
                throw LoLDUError(.state, "the adapter was inside a call on another thread when this process was forked; that thread does not exist here, so the adapter cannot be used in this process: create or load it again here (objects made before a fork() work in the child only if no call was running)")
            }
        }
    }

    /// The mutex, made by the first caller (another thread's, if it was first).
    private func made() throws(LoLDUError) -> UnsafeMutablePointer<pthread_mutex_t> {
        if let mutex = mutex.load(ordering: .acquiring) { return mutex }
        guard let new = malloc(MemoryLayout<pthread_mutex_t>.size)?.assumingMemoryBound(to: pthread_mutex_t.self) else {
            throw LoLDUError(.outOfMemory, "out of memory for the adapter's lock")
        }
        pthread_mutex_init(new, nil)
        let (exchanged, existing) = mutex.compareExchange(expected: nil, desired: new, ordering: .acquiringAndReleasing)
        guard !exchanged, let existing else { return new }
        pthread_mutex_destroy(new)
        free(new)
        return existing
    }
}
