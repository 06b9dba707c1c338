/*
 * A minimal multiboot (v1) guest that turns on intel-iommu DMA translation and halts.
 * Loaded with `-kernel`. It points the VT-d root-table address register at an empty
 * (zeroed) root table, latches it (GCMD.SRTP), enables translation (GCMD.TE), waits for
 * each to show in GSTS, then writes "TE\n" to the debug console (port 0xe9) and halts.
 * After this a correctly bound VFIO container has nothing mapped; a misbound one still
 * has all guest RAM mapped.
 */
#define VTD_BASE   0xfed90000
#define GCMD       0x18
#define GSTS       0x1c
#define RTADDR     0x20
#define CMD_TE     0x80000000
#define CMD_SRTP   0x40000000
#define ROOT_TABLE 0x00400000   /* 4 MiB: above the kernel, zero in a fresh guest */

    .text
    .code32
    .align 4
multiboot_header:               /* first in .text: QEMU looks in the first 8 KiB */
    .long 0x1BADB002            /* magic */
    .long 0                     /* flags: nothing needed from the loader */
    .long -0x1BADB002           /* checksum */

    .globl _start
_start:
    cli
    mov $VTD_BASE, %ebx
    movl $ROOT_TABLE, RTADDR(%ebx)
    movl $0, RTADDR+4(%ebx)
    movl $CMD_SRTP, GCMD(%ebx)
1:  testl $CMD_SRTP, GSTS(%ebx)    /* GSTS.RTPS has the same bit position */
    jz 1b
    movl $CMD_TE, GCMD(%ebx)
2:  testl $CMD_TE, GSTS(%ebx)      /* GSTS.TES */
    jz 2b
    mov $0xe9, %dx
    mov $'T', %al
    out %al, %dx
    mov $'E', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
3:  hlt
    jmp 3b
