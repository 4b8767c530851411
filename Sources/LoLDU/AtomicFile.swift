import Glibc

/// Files replaced atomically and read whole, with every failure an `io` error naming the path.
///
/// A replacement is written to a temporary file `.NAME.loldu-XXXXXX` beside the target, flushed with
/// `fsync`, and renamed over the target (atomic on POSIX file systems); the directory is synced
/// after each rename. Writers hold an exclusive `flock` on the directory while they replace
/// files in it, so a temporary file found while holding the lock belongs to a writer that was
/// killed: it is removed. A failure at any point removes the temporary file and leaves the
/// previous target untouched; a crash leaves either the old file or the new one, never a mix.
///
/// Only regular files are read or replaced: a FIFO, device, socket or directory where a file is
/// expected is refused before any byte is read or written (opening a FIFO for reading would
/// block forever).
public enum AtomicFile {
    /// An open temporary file.
    public struct Writer {
        let fd: Int32
        let path: String

        /// Writes all of `bytes`, retrying short writes and interruptions.
        public func write(_ bytes: UnsafeRawBufferPointer) throws(LoLDUError) {
            var done = 0
            while done < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw AtomicFile.failure("cannot write", path)
                }
                done += n
            }
        }

        public func write(_ bytes: [UInt8]) throws(LoLDUError) {
            try rethrowing { try bytes.withUnsafeBytes { raw in try write(raw) } }
        }

        /// Bytes written so far: the file's offset.
        var offset: Int { Int(lseek(fd, 0, SEEK_CUR)) }

        /// Runs `body` on the newly created file `fd` (at `path`), then flushes it to disk and
        /// closes it; `fd` is closed whatever happens.
        static func fill(_ fd: Int32, _ path: String, _ body: (Writer) throws(LoLDUError) -> Void) throws(LoLDUError) {
            var closed = false
            defer { if !closed { close(fd) } }
            try body(Writer(fd: fd, path: path))
            guard fsync(fd) == 0 else { throw AtomicFile.failure("cannot flush", path) }
            closed = true
            guard close(fd) == 0 else { throw AtomicFile.failure("cannot close", path) }
        }
    }

    /// The names in directory `path` (without "." and ".."), or nil when it cannot be read.
    static func entries(of path: String) -> [String]? {
        var undecodable = 0
        return entries(of: path, undecodable: &undecodable)
    }

    /// ``entries(of:)``, counting in `undecodable` the names left out because they are not
    /// valid UTF-8 (no path given to the library can name them), but hidden ones.
    static func entries(of path: String, undecodable: inout Int) -> [String]? {
        guard let dir = opendir(path) else { return nil }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(validatingCString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            guard let name else {
                if entry.pointee.d_name.0 != 0x2E { undecodable += 1 }  // (not ".")
                continue
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// ``entries(of:)`` of a directory whose every entry matters: `LoLDUError.io` when it
    /// cannot be read or a name that is not hidden is not valid UTF-8.
    static func allEntries(of path: String) throws(LoLDUError) -> [String] {
        var undecodable = 0
        guard let names = entries(of: path, undecodable: &undecodable) else { throw failure("cannot read", path) }
        guard undecodable == 0 else {
            throw LoLDUError(.io, "\"\(path)\" holds \(undecodable) name(s) that are not valid UTF-8; rename them")
        }
        return names
    }

    static func failure(_ what: String, _ path: String) -> LoLDUError {
        LoLDUError(.io, "\(what) \"\(path)\": \(String(cString: strerror(errno)))")
    }

    /// What a non-regular file is, for messages.
    static func kind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: "a regular file"
        case S_IFDIR: "a directory"
        case S_IFIFO: "a FIFO"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        case S_IFSOCK: "a socket"
        case S_IFLNK: "a symbolic link"
        default: "not a regular file"
        }
    }

    /// Refuses an existing `path` that is not a regular file (a symbolic link is replaced, not
    /// followed, when `followLinks` is false). Returns the path to replace.
    static func replaceable(_ path: String, followLinks: Bool) throws(LoLDUError) -> String {
        var info = stat()
        guard lstat(path, &info) == 0 else {
            if errno == ENOENT { return path }
            throw failure("cannot inspect", path)
        }
        if (info.st_mode & S_IFMT) == S_IFLNK && followLinks {
            // Followed link by link, as open(O_CREAT) would: a dangling link's target is created.
            var target = path
            for _ in 0..<40 {
                var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
                let length = readlink(target, &buffer, Int(PATH_MAX))
                guard length >= 0 else {
                    if errno == EINVAL || errno == ENOENT { return try replaceable(target, followLinks: false) }
                    throw failure("cannot resolve", target)
                }
                guard let link = String(validating: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self) else {
                    throw LoLDUError(.io, "the target of the symbolic link \"\(target)\" is not valid UTF-8; choose another path")
                }
                if link.hasPrefix("/") {
                    target = link
                } else if let slash = target.lastIndex(of: "/") {
                    target = String(target[...slash]) + link
                } else {
                    target = link
                }
            }
            errno = ELOOP
            throw failure("cannot resolve", path)
        }
        let type = info.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFLNK else {
            throw LoLDUError(.io, "\"\(path)\" is \(kind(info.st_mode)), not a regular file; choose another path")
        }
        return path
    }

    /// A directory held under `flock` while files in it are read or replaced.
    final class LockedDirectory {
        let path: String
        private let fd: Int32
        /// Whether this lock created the directory (so that a failed first write can remove it).
        let created: Bool
        /// How long to wait for another process's lock before giving up.
        static let patience: Double = 30

        /// Opens (with `create`, first creating) `path` and locks it: exclusively for writers,
        /// shared for readers. A file system without `flock` is used unlocked.
        init(_ path: String, exclusive: Bool, create: Bool = false) throws(LoLDUError) {
            (fd, created) = try Self.openLocked(path, exclusive: exclusive, create: create)
            self.path = path
        }

        /// The locked directory's descriptor, and whether this call created it. The lock is
        /// taken on the directory opened, while files are named by path: a lock obtained on a
        /// directory that was removed meanwhile (a failed save removes one it created) is let go,
        /// and the directory now at `path` locked instead.
        private static func openLocked(_ path: String, exclusive: Bool, create: Bool) throws(LoLDUError) -> (Int32, Bool) {
            let start = monotonicSeconds()
            var created = false
            var pause = 0.001
            while true {
                if create, try AtomicFile.makeDirectory(path) { created = true }
                let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK)
                guard fd >= 0 else {
                    let code = errno
                    if created { rmdir(path) }
                    var info = stat()
                    if code == ENOTDIR, stat(path, &info) == 0 {
                        throw LoLDUError(.io, "\"\(path)\" is \(AtomicFile.kind(info.st_mode)), not a directory")
                    }
                    errno = code
                    throw AtomicFile.failure("cannot open directory", path)
                }
                HeldLocks.add(fd)
                if flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0 {
                    var held = stat(), current = stat()
                    if fstat(fd, &held) == 0, stat(path, &current) == 0, held.st_dev == current.st_dev, held.st_ino == current.st_ino {
                        return (fd, created)
                    }
                } else if errno != EWOULDBLOCK && errno != EINTR {
                    return (fd, created)  // no flock here
                }
                HeldLocks.close(fd)
                guard monotonicSeconds() - start < patience else {  // (time that passed: a signal cuts pauses short)
                    throw LoLDUError(.io, "\"\(path)\" is locked by another process writing into it (waited \(Int(patience)) s)")
                }
                var ts = timespec(tv_sec: 0, tv_nsec: Int(pause * 1e9))
                nanosleep(&ts, nil)
                pause = Swift.min(pause * 2, 0.1)
            }
        }

        deinit { HeldLocks.close(fd) }  // releases the lock

        func file(_ name: String) -> String { "\(path)/\(name)" }

        /// Removes `.NAME.loldu-XXXXXX` files left by killed writers (call with the exclusive lock).
        func removeStaleTemporaries(of names: [String]) {
            for entry in AtomicFile.entries(of: path) ?? [] where names.contains(where: { AtomicFile.isTemporary(entry, of: $0) }) {
                var info = stat()  // (regular files only: a link or a directory of that name is not one of them)
                if fstatat(fd, entry, &info, AT_SYMLINK_NOFOLLOW) == 0 && (info.st_mode & S_IFMT) == S_IFREG {
                    unlinkat(fd, entry, 0)
                }
            }
        }

        /// Writes a new version of `name` to a temporary file, flushed to disk; returns its path
        /// for ``commit(_:as:)``. On failure nothing is left behind.
        func prepare(_ name: String, _ body: (Writer) throws(LoLDUError) -> Void) throws(LoLDUError) -> String {
            var template = Array("\(path)/\(AtomicFile.temporaryPrefix(of: name))XXXXXX".utf8CString)
            let out = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
            guard out >= 0 else { throw AtomicFile.failure("cannot create a temporary file in", path) }
            let temporary = String(cString: template.withUnsafeBufferPointer { $0.baseAddress! })
            do throws(LoLDUError) {
                _ = fcntl(out, F_SETFD, FD_CLOEXEC)
                _ = fchmod(out, 0o644)
                try Writer.fill(out, temporary, body)
            } catch {
                unlink(temporary)
                throw error
            }
            return temporary
        }

        /// Renames `source` (a path in this directory) to `name`, atomically, and syncs the
        /// directory. On failure `source` is removed when `removeOnFailure`.
        func commit(_ source: String, as name: String, removeOnFailure: Bool = true) throws(LoLDUError) {
            let target = file(name)
            do throws(LoLDUError) {
                _ = try AtomicFile.replaceable(target, followLinks: false)
                guard rename(source, target) == 0 else { throw AtomicFile.failure("cannot replace", target) }
            } catch {
                if removeOnFailure { unlink(source) }
                throw error
            }
            _ = fsync(fd)
        }

        /// `prepare` then `commit`: replaces `name` atomically.
        func replace(_ name: String, _ body: (Writer) throws(LoLDUError) -> Void) throws(LoLDUError) {
            try commit(try prepare(name, body), as: name)
        }
    }

    /// The start of the name of a temporary file or directory of `name`, before six random
    /// letters or digits: distinctive, so that the clean-up of leftovers never takes another
    /// program's `.NAME.something`. `NAME` is cut to its first 241 bytes (whole characters), so
    /// that every name a file system takes (255 bytes) has temporaries.
    static func temporaryPrefix(of name: String) -> String {
        var kept = Substring(name)
        while kept.utf8.count > 255 - ".".utf8.count - ".loldu-".utf8.count - 6 { kept.removeLast() }
        return ".\(kept).loldu-"
    }

    /// Whether `entry` is a temporary file or directory of `name` (``temporaryPrefix(of:)`` and
    /// six letters or digits).
    static func isTemporary(_ entry: String, of name: String) -> Bool {
        let prefix = temporaryPrefix(of: name)
        guard entry.hasPrefix(prefix) else { return false }
        let suffix = entry.utf8.dropFirst(prefix.utf8.count)
        return suffix.count == 6 && suffix.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A)
        }
    }

    /// Replaces the file at `path` atomically with what `body` writes. A symbolic link is
    /// followed (its target is replaced); anything else that is not a regular file is refused.
    public static func write(to path: String, _ body: (Writer) throws(LoLDUError) -> Void) throws(LoLDUError) {
        let target = try replaceable(path, followLinks: true)
        let name = target.split(separator: "/").last.map(String.init) ?? target
        let directory = try LockedDirectory(parent(of: target), exclusive: true)
        directory.removeStaleTemporaries(of: [name])
        try directory.replace(name, body)
    }

    /// Opens a regular file for reading without blocking (a FIFO would block `open`), or
    /// returns `nil` when it does not exist and `missingOK`.
    static func openRegular(_ path: String, missingOK: Bool = false) throws(LoLDUError) -> (fd: Int32, size: Int)? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            if missingOK && errno == ENOENT { return nil }
            throw failure("cannot open", path)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = failure("cannot stat", path)
            close(fd)
            throw error
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw LoLDUError(.io, "\"\(path)\" is \(kind(info.st_mode)), not a regular file")
        }
        return (fd, Int(info.st_size))
    }

    /// The whole file, refusing anything larger than `limit` bytes; `nil` if it does not exist
    /// and `missingOK`. Memory that cannot be had is an `outOfMemory` error.
    static func read(_ path: String, limit: Int, missingOK: Bool = false) throws(LoLDUError) -> FileBytes? {
        guard let (fd, size) = try openRegular(path, missingOK: missingOK) else { return nil }
        defer { close(fd) }
        guard size <= limit else {
            throw LoLDUError(.format, "\"\(path)\" is \(size) bytes, more than the \(limit) this file may have")
        }
        let bytes = try HeapBuffer<UInt8>(count: size)
        let done = try read(fd, at: 0, count: size, into: bytes.pointer, path: path)  // (fewer: the file shrank meanwhile)
        return FileBytes(bytes, count: done)
    }

    /// Reads `count` bytes of the open file `fd` (at `path`) from byte `offset` into
    /// `destination`, retrying short reads and interruptions; returns how many there were before
    /// the end of the file.
    static func read(_ fd: Int32, at offset: Int, count: Int, into destination: UnsafeMutableRawPointer,
                     path: String) throws(LoLDUError) -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, destination + done, count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("cannot read", path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// The whole file (see ``read(_:limit:missingOK:)``); a missing file is an `io` error.
    static func read(_ path: String, limit: Int) throws(LoLDUError) -> FileBytes {
        guard let bytes = try read(path, limit: limit, missingOK: false) else { throw failure("cannot open", path) }
        return bytes
    }

    /// Creates `path` as a directory unless it already is one; returns whether it created it.
    @discardableResult
    static func makeDirectory(_ path: String) throws(LoLDUError) -> Bool {
        if mkdir(path, 0o755) == 0 { return true }
        let code = errno
        var info = stat()
        if code == EEXIST, stat(path, &info) == 0 {
            if (info.st_mode & S_IFMT) == S_IFDIR { return false }
            throw LoLDUError(.io, "\"\(path)\" is \(kind(info.st_mode)), not a directory")
        }
        errno = code
        throw failure("cannot create directory", path)
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let head = path[..<slash]
        return head.isEmpty ? "/" : String(head)
    }
}

/// Bytes read by range: a file read whole into memory (``FileBytes``) or an open file read on
/// demand (``OpenFile``).
protocol ByteSource: AnyObject, Sendable {
    var count: Int { get }
    /// Copies the bytes in `range` (within `0..<count`) to `destination`.
    func read(_ range: Range<Int>, into destination: UnsafeMutableRawPointer) throws(LoLDUError)
}

/// A file's bytes in memory (see ``AtomicFile/read(_:limit:missingOK:)``).
final class FileBytes: ByteSource, @unchecked Sendable {
    private let storage: HeapBuffer<UInt8>
    let count: Int

    init(_ storage: HeapBuffer<UInt8>, count: Int) {
        self.storage = storage
        self.count = count
    }

    /// A copy of `bytes`.
    convenience init(copying bytes: UnsafeRawBufferPointer) throws(LoLDUError) {
        let storage = try HeapBuffer<UInt8>(count: bytes.count)
        if let base = bytes.baseAddress { storage.pointer.update(from: base.assumingMemoryBound(to: UInt8.self), count: bytes.count) }
        self.init(storage, count: bytes.count)
    }

    func withUnsafeBytes<R, Failure: Error>(_ body: (UnsafeRawBufferPointer) throws(Failure) -> R) throws(Failure) -> R {
        try body(UnsafeRawBufferPointer(start: storage.pointer, count: count))
    }

    func read(_ range: Range<Int>, into destination: UnsafeMutableRawPointer) throws(LoLDUError) {
        destination.copyMemory(from: storage.pointer + range.lowerBound, byteCount: range.count)
    }
}

/// A regular file kept open and read by range (`pread`): a model's weights are read one tensor
/// at a time instead of mapped, so memory stays near one tensor, and a file truncated by
/// another process while in use is a `format` error, not a `SIGBUS`.
final class OpenFile: ByteSource, @unchecked Sendable {
    private let fd: Int32
    let count: Int
    let path: String

    init(_ path: String) throws(LoLDUError) {
        guard let (fd, size) = try AtomicFile.openRegular(path) else { throw AtomicFile.failure("cannot open", path) }
        self.fd = fd
        self.count = size
        self.path = path
    }

    deinit { close(fd) }

    func read(_ range: Range<Int>, into destination: UnsafeMutableRawPointer) throws(LoLDUError) {
        let done = try AtomicFile.read(fd, at: range.lowerBound, count: range.count, into: destination, path: path)
        guard done == range.count else {
            throw LoLDUError(.format, "\"\(path)\" ends at byte \(range.lowerBound + done), but had \(count) bytes when opened (truncated or replaced while in use?)")
        }
    }
}
