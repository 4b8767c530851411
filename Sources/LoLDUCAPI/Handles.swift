import Glibc
import LoLDU

/// The live objects behind C handles, one table per kind. A handle is an opaque token (a counter
/// value shared by all kinds, never an address and never reused), so a NULL, stale, double-freed
/// or made-up handle, and a handle of another kind passed in its place
/// (`loldu_adapter_free((loldu_adapter *)optimizer)`), are recognised and answered with a status
/// instead of being dereferenced. Each table holds its objects with their own type (no cast on
/// look-up); the kinds are consulted together only to name a wrong kind in a message.
private let registry = Registry()

/// The token counter and the tables, under one mutex that also guards every table's objects
/// (every call looks its handles up under it).
private final class Registry: @unchecked Sendable {
    var next: UInt = 0x10
    var tables: [any KindTable] = []
    private let mutex = ProcessMutex()

    func withLock<R, Failure: Error>(_ body: () throws(Failure) -> R) throws(Failure) -> R {
        try mutex.withLock(body)
    }

    /// The kind of a live token, for a message (under the lock).
    func kind(of token: UInt) -> String? {
        tables.first { $0.holds(token) }?.kind
    }
}

private protocol KindTable: AnyObject {
    var kind: String { get }
    /// Under the registry's lock.
    func holds(_ token: UInt) -> Bool
}

/// The handles of one kind.
final class HandleTable<Object: Sendable>: KindTable, @unchecked Sendable {
    let kind: String
    /// Under the registry's lock.
    private var objects: [UInt: Object] = [:]
    /// Whether a live object may be used in this process (run on every look-up but `remove`).
    private let usable: (Object) throws(LoLDUError) -> Void

    init(kind: String, usable: @escaping (Object) throws(LoLDUError) -> Void = { _ in }) {
        self.kind = kind
        self.usable = usable
        registry.withLock { registry.tables.append(self) }
    }

    fileprivate func holds(_ token: UInt) -> Bool { objects[token] != nil }

    private static func token(_ handle: OpaquePointer) -> UInt {
        UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(handle)))
    }

    func insert(_ object: Object) -> OpaquePointer {
        let token = registry.withLock {
            let token = registry.next
            registry.next += 0x10
            objects[token] = object
            return token
        }
        return OpaquePointer(bitPattern: token)!
    }

    /// The object of a live handle of this kind, under the lock. `name` (the argument, for the
    /// message) is built only on failure.
    private func lookUp(_ handle: OpaquePointer?, _ name: () -> String) throws(LoLDUError) -> Object {
        guard let handle else {
            throw LoLDUError(.nullPointer, "\(name()) is NULL; expected a live \(kind) handle")
        }
        let token = Self.token(handle)
        if let object = objects[token] {
            try usable(object)
            return object
        }
        if let other = registry.kind(of: token) {
            throw LoLDUError(.invalidHandle, "\(name()) is a \(other) handle, not a \(kind) handle")
        }
        throw LoLDUError(.invalidHandle, "\(name()) is not a live \(kind) handle (never created, or already freed)")
    }

    func get(_ handle: OpaquePointer?, _ name: @autoclosure () -> String) throws(LoLDUError) -> Object {
        try registry.withLock { () throws(LoLDUError) in try lookUp(handle, name) }
    }

    /// `get` of `handles[i]` for every `i` in `indices`, under one lock (a grouped call looks up
    /// every adapter its rows use); `name(i)` names `handles[i]`.
    func get(_ handles: UnsafePointer<OpaquePointer?>, _ indices: [Int], _ name: (Int) -> String) throws(LoLDUError) -> [Object] {
        try registry.withLock { () throws(LoLDUError) in
            var found: [Object] = []
            found.reserveCapacity(indices.count)
            for i in indices { found.append(try lookUp(handles[i], { name(i) })) }
            return found
        }
    }

    /// Removes a handle of this kind; returns whether it was one (any other value: no-op).
    @discardableResult
    func remove(_ handle: OpaquePointer?) -> Bool {
        guard let handle else { return false }
        let removed = registry.withLock { objects.removeValue(forKey: Self.token(handle)) }
        return removed != nil  // the object is released here, outside the lock
    }
}

/// (An adapter that a thread of the parent was computing with at a fork is refused in the child.)
let adapters = HandleTable<any AnyAdapter>(kind: "loldu_adapter") { adapter throws(LoLDUError) in try adapter.checkUsable() }

// MARK: Thread-local last error

private let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

func setLastError(_ message: String) {
    let previous = pthread_getspecific(lastErrorKey)
    pthread_setspecific(lastErrorKey, strdup(message))
    free(previous)
}

func lastErrorMessage() -> UnsafePointer<CChar> {
    if let message = pthread_getspecific(lastErrorKey) {
        return UnsafePointer(message.assumingMemoryBound(to: CChar.self))
    }
    return cString("")
}

/// A C string with static storage.
func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// Runs a thunk body: `LOLDU_OK`, or the error's status with its message recorded.
@inline(__always)
func status(_ body: () throws(LoLDUError) -> Void) -> Int32 {
    do {
        try body()
        return 0
    } catch {
        setLastError(error.message)
        return error.code.rawValue
    }
}
