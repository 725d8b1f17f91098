/*
 * outb: ends the VM with an exit code. Writes its argument (0-255) to qemu's
 * isa-debug-exit port (0xf4); qemu then exits with status (value << 1) | 1.
 * The guest kernel has no /dev/port, hence this helper. Built by xtask with
 * the host's cc (static, so it needs no libraries in the initramfs).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: outb VALUE\n");
		return 2;
	}
	if (ioperm(0xf4, 4, 1) != 0) {
		perror("outb: ioperm(0xf4)");
		return 1;
	}
	outb((unsigned char)strtoul(argv[1], NULL, 0), 0xf4);
	/* Only reached if qemu has no isa-debug-exit device. */
	fprintf(stderr, "outb: still running: no isa-debug-exit device?\n");
	return 1;
}
