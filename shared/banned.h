/* banned.h - include LAST in a .c file: makes unsafe string functions unbuildable.
 * Use snprintf and memcpy with explicit sizes instead. */
#ifndef MTP_BANNED_H
#define MTP_BANNED_H
#if defined(__GNUC__)
#pragma GCC poison sprintf strcpy strcat vsprintf gets
#endif
#endif
