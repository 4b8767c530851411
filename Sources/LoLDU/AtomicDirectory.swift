import Glibc

/// A directory that appears whole or not at all: an export or a merged model.
///
/// It is written under a temporary name `.NAME.loldu-XXXXXX` beside the target, every file flushed
/// with `fsync`, then renamed into place in one step: with `RENAME_NOREPLACE` when it is new
/// (a directory that appeared meanwhile is never overwritten), or swapped with the previous one
/// by `RENAME_EXCHANGE` when it replaces it (the previous one is then deleted). A failure
/// removes the temporary directory; a killed writer leaves it behind, and the next writer of
/// the same target removes it: each writer holds an exclusive `flock` on its temporary
/// directory, so one that can be locked belongs to nobody.
final class AtomicDirectory {
    /// The final path.
    let target: String
    /// Where the files are written until ``commit()``.
    let path: String
    private let fd: Int32
    private var committed = false

    /// Starts writing the directory `target` (whose parent must exist) under a temporary name;
    /// `what` names the argument in errors.
    init(_ target: String, what: String) throws(LoLDUError) {
        let (trimmed, parent, name) = try Self.parts(target, what: what)
        Self.removeStale(in: parent, of: name)
        // mkdir, not mkdtemp: the directory gets the permissions the umask gives (mkdtemp's are 0700).
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        var system = SystemRandomNumberGenerator()
        var path = "", fd: Int32 = -1
        for attempt in 0... {
            path = "\(parent)/\(AtomicFile.temporaryPrefix(of: name))" + String((0..<6).map { _ in letters[Int(system.next() % UInt64(letters.count))] })
            guard mkdir(path, 0o755) == 0 else {
                guard errno == EEXIST, attempt < 100 else { throw AtomicFile.failure("cannot create a directory in", parent) }
                continue
            }
            fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW)
            guard fd >= 0 || errno == ENOENT else {
                let error = AtomicFile.failure("cannot open", path)
                rmdir(path)
                throw error
            }
            // Between mkdir and flock another writer's clean-up may lock and remove the new
            // directory: it is ours only if the lock is, and the path still names it.
            var mine = stat(), named = stat()
            if fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0 && fstat(fd, &mine) == 0 && lstat(path, &named) == 0
                && mine.st_dev == named.st_dev && mine.st_ino == named.st_ino {
                break
            }
            if fd >= 0 { close(fd) }
            guard attempt < 100 else { throw LoLDUError(.io, "cannot create a directory in \"\(parent)\": other writers keep removing it") }
        }
        self.target = trimmed
        self.path = path
        self.fd = fd
        HeldLocks.add(fd)
    }

    /// `target` without trailing slashes, its parent and its name; `invalid` (naming `what`) for
    /// a name that is empty, `.`, `..`, or longer than the parent's file system takes (checked
    /// now, not when the finished directory is renamed into place).
    static func parts(_ target: String, what: String) throws(LoLDUError) -> (trimmed: String, parent: String, name: String) {
        let trimmed = Self.trimmed(target)
        let parent = AtomicFile.parent(of: trimmed)
        let name = trimmed.split(separator: "/").last.map(String.init) ?? trimmed
        guard !name.isEmpty, name != ".", name != ".." else {
            throw .invalid("\(what) \"\(target)\" must name the new directory (or an empty one) by its name, not \"\(name)\"")
        }
        let limit = pathconf(parent, Int32(_PC_NAME_MAX))  // (-1 if unknown: the parent is checked when it is written in)
        guard limit < 0 || name.utf8.count <= limit else {
            throw .invalid("\(what) \"\(target)\": the name \"\(name.prefix(24))…\" is \(name.utf8.count) bytes; the file system of \"\(parent)\" takes names of at most \(limit) bytes")
        }
        return (trimmed, parent, name)
    }

    deinit {
        if !committed { Self.removeTree(path) }
        HeldLocks.close(fd)
    }

    func file(_ name: String) -> String { "\(path)/\(name)" }

    /// Creates `name` (with its missing parent directories inside this one) from what `body`
    /// writes, flushed to disk.
    func write(_ name: String, _ body: (AtomicFile.Writer) throws(LoLDUError) -> Void) throws(LoLDUError) {
        var parent = ""
        for component in name.split(separator: "/").dropLast() {
            parent += (parent.isEmpty ? "" : "/") + component
            try AtomicFile.makeDirectory(file(parent))
        }
        let full = file(name)
        let out = open(full, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard out >= 0 else { throw AtomicFile.failure("cannot create", full) }
        try AtomicFile.Writer.fill(out, full, body)
    }

    /// Copies the regular file `source` to `name`.
    func copy(_ source: String, as name: String) throws(LoLDUError) {
        guard let (input, size) = try AtomicFile.openRegular(source) else { throw AtomicFile.failure("cannot open", source) }
        defer { close(input) }
        try write(name) { out throws(LoLDUError) in
            var done = 0
            let chunk = 1 << 20
            let buffer = try HeapBuffer<UInt8>(count: chunk)
            while true {
                let n = read(input, buffer.pointer, chunk)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw AtomicFile.failure("cannot read", source)
                }
                if n == 0 { break }
                try out.write(UnsafeRawBufferPointer(start: buffer.pointer, count: n))
                done += n
            }
            guard done == size else { throw LoLDUError(.io, "\"\(source)\" changed size while it was copied") }
        }
    }

    /// `target` without trailing slashes: the name ``init(_:what:)`` and ``commit(replace:)``
    /// give the directory (`out/` is `out`, even when `out` is a link).
    static func trimmed(_ target: String) -> String {
        var trimmed = target
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        return trimmed
    }

    /// Whether `target` (``trimmed(_:)``) exists, other than as a directory with nothing in it
    /// (as `mkdir out` leaves it): a file, a symbolic link (``commit(replace:)`` refuses
    /// links) or a directory with entries; `info` is its `lstat`.
    static func exists(_ target: String, _ info: inout stat) -> Bool {
        let path = trimmed(target)
        guard lstat(path, &info) == 0 else { return false }
        guard (info.st_mode & S_IFMT) == S_IFDIR else { return true }
        var undecodable = 0
        return AtomicFile.entries(of: path, undecodable: &undecodable)?.isEmpty != true || undecodable > 0
    }

    /// Puts the directory in place: a new `target`, or in place of an empty directory, if
    /// `replace` is false (one with files is an error); else swapped with the existing one,
    /// which is then deleted.
    func commit(replace: Bool) throws(LoLDUError) {
        guard fsync(fd) == 0 else { throw AtomicFile.failure("cannot flush", path) }
        var info = stat()
        let exists = lstat(target, &info) == 0
        if exists && (info.st_mode & S_IFMT) != S_IFDIR {
            throw LoLDUError(.io, "\"\(target)\" is \(AtomicFile.kind(info.st_mode)), not a directory")
        }
        if exists && replace {
            guard Self.rename(path, target, exchange: true) else { throw AtomicFile.failure("cannot replace", target) }
            committed = true
            Self.removeTree(path)  // the previous directory, now under the temporary name
        } else {
            // rename(2) replaces an empty directory, atomically, and refuses one that is not;
            // where there is none, no other may appear in its place meanwhile.
            let moved = exists ? Glibc.rename(path, target) == 0 : Self.rename(path, target, exchange: false)
            guard moved else {
                throw errno == EEXIST || errno == ENOTEMPTY ? LoLDUError(.io, "\"\(target)\" already exists")
                    : AtomicFile.failure("cannot create", target)
            }
            committed = true
        }
        let parent = open(AtomicFile.parent(of: target), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if parent >= 0 {
            _ = fsync(parent)
            close(parent)
        }
    }

    private typealias Renameat2 = @convention(c) (Int32, UnsafePointer<CChar>, Int32, UnsafePointer<CChar>, UInt32) -> Int32
    private static let renameat2: Renameat2? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "renameat2")
        .map { unsafeBitCast($0, to: Renameat2.self) }

    /// `renameat2` with `RENAME_EXCHANGE` (2) or `RENAME_NOREPLACE` (1). Where the C library or
    /// the file system lacks it: a check and a plain rename (new), or two renames (exchange).
    private static func rename(_ from: String, _ to: String, exchange: Bool) -> Bool {
        if let renameat2, renameat2(AT_FDCWD, from, AT_FDCWD, to, exchange ? 2 : 1) == 0 { return true }
        if renameat2 != nil && errno != EINVAL && errno != ENOSYS { return false }
        if !exchange {
            var info = stat()
            if lstat(to, &info) == 0 {
                errno = EEXIST
                return false
            }
            return Glibc.rename(from, to) == 0
        }
        let aside = from + ".old"
        guard Glibc.rename(to, aside) == 0 else { return false }
        guard Glibc.rename(from, to) == 0 else {
            _ = Glibc.rename(aside, to)
            return false
        }
        return Glibc.rename(aside, from) == 0
    }

    /// Removes temporary directories of `name` whose writers are gone (no one holds their lock).
    private static func removeStale(in parent: String, of name: String) {
        for entry in AtomicFile.entries(of: parent) ?? [] where AtomicFile.isTemporary(entry, of: name) {
            let path = "\(parent)/\(entry)"
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW)
            guard fd >= 0 else { continue }
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { removeTree(path) }
            close(fd)
        }
    }

    /// Deletes `path` and everything under it, never following symbolic links.
    static func removeTree(_ path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        if (info.st_mode & S_IFMT) == S_IFDIR, let entries = AtomicFile.entries(of: path) {
            for name in entries { removeTree("\(path)/\(name)") }
            rmdir(path)
        } else {
            unlink(path)
        }
    }
}

/// Refuses (`invalid`, naming `what`) a directory name an export or a merge could not create
/// (see ``AtomicDirectory/parts(_:what:)``): for callers with long work to do before writing.
public func checkNewDirectoryName(_ target: String, what: String) throws(LoLDUError) {
    _ = try AtomicDirectory.parts(target, what: what)
}
