//! The child's side: running the mount program in the new mount namespace with raw syscalls over C
//! strings prepared before the fork.

use super::*;

/// Child: run the ops in order. On failure returns (index of the op, errno).
pub fn child_run(ops: &[Op]) -> Result<(), (u32, i32)> {
    for (i, op) in ops.iter().enumerate() {
        // SAFETY: see child_op.
        if let Err(e) = unsafe { child_op(op) } {
            return Err((i as u32, e));
        }
    }
    Ok(())
}

/// # Safety
/// Must only be called in the freshly cloned child, in its own mount namespace, whose memory is
/// a private copy (no CLONE_VM): all pointers come from `CString`s owned by `op`.
pub(super) unsafe fn child_op(op: &Op) -> Result<(), i32> {
    let err = || Err(crate::fds::errno());
    let null = std::ptr::null::<libc::c_char>();
    match op {
        Op::MakePrivate => {
            let root = c"/";
            // SAFETY: valid C strings or NULL as mount(2) allows for a propagation change.
            if unsafe {
                libc::mount(
                    null,
                    root.as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            } != 0
            {
                return err();
            }
        }
        Op::Mount {
            fstype,
            dst,
            flags,
            data,
        } => {
            let d = data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
            // SAFETY: valid C strings; data is NULL or a valid C string.
            if unsafe { libc::mount(fstype.as_ptr(), dst.as_ptr(), fstype.as_ptr(), *flags, d) }
                != 0
            {
                return err();
            }
        }
        Op::Bind {
            src,
            dst,
            recursive,
        } => {
            let mut flags = libc::MS_BIND;
            if *recursive {
                flags |= libc::MS_REC;
            }
            // SAFETY: valid C strings; bind mounts ignore fstype and data.
            if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), null, flags, std::ptr::null()) }
                != 0
            {
                return err();
            }
        }
        Op::SetAttr {
            path,
            set,
            recursive,
        } => {
            let attr = MountAttr {
                attr_set: *set,
                ..MountAttr::default()
            };
            let flags = if *recursive { libc::AT_RECURSIVE } else { 0 } as libc::c_uint;
            // SAFETY: valid C string, valid mount_attr of the size passed.
            if unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    flags,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                )
            } != 0
            {
                return err();
            }
        }
        Op::Mkdir { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0
                && crate::fds::errno() != libc::EEXIST
            {
                return err();
            }
        }
        Op::Touch { path } => {
            // SAFETY: valid C string; the fd is closed right away.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o444 as libc::c_uint,
                )
            };
            if fd < 0 {
                return err();
            }
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
        }
        Op::WriteFile { path, contents } => {
            // SAFETY: valid C string; the fd is closed below.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC
                        | libc::O_NOFOLLOW,
                    0o444 as libc::c_uint,
                )
            };
            if fd < 0 {
                return err();
            }
            let mut rest: &[u8] = contents;
            while !rest.is_empty() {
                // SAFETY: `rest` is a live slice; write reads at most its length.
                let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
                if n < 0 && crate::fds::errno() == libc::EINTR {
                    continue;
                }
                if n <= 0 {
                    let e = err();
                    // SAFETY: closing the fd opened above.
                    unsafe { libc::close(fd) };
                    return e;
                }
                rest = &rest[n as usize..];
            }
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
        }
        Op::Symlink { target, path } => {
            // SAFETY: valid C strings.
            if unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) } != 0 {
                return err();
            }
        }
        Op::Chdir { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::chdir(path.as_ptr()) } != 0 {
                return err();
            }
        }
        Op::PivotRoot { new_root, put_old } => {
            // SAFETY: valid C strings.
            if unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) }
                != 0
            {
                return err();
            }
        }
        Op::Detach { path } => {
            // SAFETY: valid C string.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                return err();
            }
        }
        Op::BindTree { src, dst, dev, ino } => {
            // SAFETY: see child_bind_tree.
            return unsafe { child_bind_tree(src, dst, *dev, *ino) };
        }
        Op::MoveMount { fd, dst } => {
            let empty = c"";
            // SAFETY: valid C strings; `fd` is the detached workspace tree inherited from the
            // parent.
            if unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    *fd,
                    empty.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                )
            } != 0
            {
                return err();
            }
        }
    }
    Ok(())
}

/// # Safety
/// As [`child_op`]: raw syscalls on C strings owned by the caller; every fd opened here is
/// closed before returning.
pub(super) unsafe fn child_bind_tree(
    src: &CString,
    dst: &CString,
    dev: u64,
    ino: u64,
) -> Result<(), i32> {
    let how = OpenHowRaw {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: valid C string and open_how of the size passed; returns a new fd or -1.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            src.as_ptr(),
            &how as *const OpenHowRaw,
            std::mem::size_of::<OpenHowRaw>(),
        )
    };
    if dir < 0 {
        return Err(crate::fds::errno());
    }
    let dir = dir as RawFd;
    let close = |fd: RawFd| {
        // SAFETY: closing an fd this function opened.
        unsafe { libc::close(fd) };
    };
    // SAFETY: all-zero is a valid `struct stat`; fstat of the fd just opened into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(dir, &mut st) } != 0 {
        let e = crate::fds::errno();
        close(dir);
        return Err(e);
    }
    if st.st_dev != dev || st.st_ino != ino {
        // Not the directory the supervisor checked (it was replaced meanwhile).
        close(dir);
        return Err(libc::ESTALE);
    }
    let empty = c"";
    // SAFETY: an empty path relative to the fd just opened (AT_EMPTY_PATH); returns a new fd.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir,
            empty.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_EMPTY_PATH as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    let e = crate::fds::errno();
    close(dir);
    if tree < 0 {
        return Err(e);
    }
    let tree = tree as RawFd;
    // SAFETY: valid C strings; `tree` is the detached mount just created.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    let e = crate::fds::errno();
    close(tree);
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

/// `struct open_how` for openat2(2) (the child's copy; see `fds::open_no_symlinks`).
#[repr(C)]
pub(super) struct OpenHowRaw {
    pub(super) flags: u64,
    pub(super) mode: u64,
    pub(super) resolve: u64,
}

pub(super) const RESOLVE_NO_SYMLINKS: u64 = 0x04;
