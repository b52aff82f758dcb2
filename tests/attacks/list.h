/* Every attack of the suite, in X-macro form (see main.c). */
/* fs.c */
X(read_shadow) X(read_secret) X(dotdot) X(proc_root) X(symlink_planted) X(symlink_created)
X(hardlink) X(write_file) X(write_host_tmp) X(reopen_rw) X(proc_self_exe) X(leaked_dirfd)
X(leaked_fds) X(leaked_env) X(open_by_handle) X(mknod) X(dev_disk) X(setuid_plant)
X(proc_sys_write) X(sysrq) X(sys_write) X(chroot) X(reopen_stdin) X(plant_symlink) X(file_caps)
/* exec.c */
X(exec_proof) X(exec_copy) X(exec_memfd) X(exec_memfd_execveat) X(mmap_exec) X(exec_ldso)
X(suid_exec)
/* net.c */
X(tcp4) X(tcp6) X(udp4) X(unix_path) X(unix_abstract) X(raw) X(packet) X(netlink) X(vsock)
X(socket_other)
/* proc.c */
X(marker) X(ptrace) X(pvm_read) X(kill) X(kill_all) X(pidfd) X(setns) X(prlimit)
X(proc_marker) X(proc_environ) X(daemonize) X(ptrace_child) X(coredump) X(sysv_shm)
/* kern.c */
X(mount) X(umount) X(remount_rw) X(open_tree) X(fsopen) X(move_mount) X(unshare_user)
X(clone_newuser) X(clone3_newuser) X(unshare_other) X(keyctl) X(bpf) X(perf_event)
X(userfaultfd) X(io_uring) X(module) X(reboot) X(sethostname) X(settime) X(syslog) X(kallsyms)
X(iopl) X(fanotify) X(personality) X(caps) X(setuid) X(capset) X(rlimit_raise) X(tiocsti)
X(tioclinux) X(devtty)
/* arch.c */
X(x32) X(int80) X(int80_socket)
/* res.c */
X(fork_bomb) X(mem_bomb) X(disk_fill) X(tmp_fill) X(spin)
