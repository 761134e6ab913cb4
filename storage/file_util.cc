#include "storage/file_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace sqkv {

Status ErrnoStatus(const std::string& what, const std::string& path, int err) {
  std::string msg = what + " " + path + ": " + std::strerror(err);
  if (err == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

Status EnsureDir(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return Status::IOError("create directory " + path + ": " + ec.message());
  return Status::Ok();
}

Status FsyncDir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open directory", path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return ErrnoStatus("fsync directory", path, err);
  return Status::Ok();
}

Status RenameDurable(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoStatus("rename to " + to, from, errno);
  return FsyncDir(std::filesystem::path(to).parent_path().string());
}

Status RemoveFile(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus("remove", path, errno);
  return Status::Ok();
}

Status ListFiles(const std::string& dir, std::vector<std::string>* names) {
  names->clear();
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus("list", dir, errno);
  while (dirent* e = ::readdir(d)) {
    if (e->d_type == DT_REG || e->d_type == DT_UNKNOWN) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names->push_back(std::move(n));
    }
  }
  ::closedir(d);
  return Status::Ok();
}

Result<uint64_t> FileSize(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus("stat", path, errno);
  return static_cast<uint64_t>(st.st_size);
}

Status OpenRegularFile(const std::string& path, int* fd, uint64_t* size) {
  *fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (*fd < 0) return ErrnoStatus("cannot open", path, errno);
  struct stat st {};
  if (::fstat(*fd, &st) != 0) {
    Status s = ErrnoStatus("cannot stat", path, errno);
    ::close(*fd);
    *fd = -1;
    return s;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(*fd);
    *fd = -1;
    return Status::InvalidArgument(path + ": not a regular file");
  }
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

uint64_t DirectoryBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec)) total += it->file_size(ec);
  }
  return total;
}

Status WriteFileAtomically(const std::string& path, const std::vector<std::string_view>& parts) {
  std::string tmp = path + ".tmp-XXXXXX";
  const int fd = mkstemp(tmp.data());
  if (fd < 0) return ErrnoStatus("cannot create a temporary file for", path, errno);
  auto fail = [&](const std::string& what) {
    Status st = ErrnoStatus(what, tmp, errno);
    close(fd);
    unlink(tmp.c_str());
    return st;
  };
  if (fchmod(fd, 0644) != 0) return fail("cannot chmod");
  for (std::string_view part : parts) {
    while (!part.empty()) {
      const ssize_t n = write(fd, part.data(), part.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return fail("cannot write");
      part.remove_prefix(static_cast<size_t>(n));
    }
  }
  if (fsync(fd) != 0) return fail("cannot fsync");
  if (close(fd) != 0) {
    Status st = ErrnoStatus("cannot close", tmp, errno);
    unlink(tmp.c_str());
    return st;
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    Status st = ErrnoStatus("cannot rename " + tmp + " to", path, errno);
    unlink(tmp.c_str());
    return st;
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return ErrnoStatus("cannot open directory", dir, errno);
  const bool synced = fsync(dir_fd) == 0;
  Status st = synced ? Status::Ok() : ErrnoStatus("cannot fsync directory", dir, errno);
  close(dir_fd);
  return st;
}

uint64_t Checksum64(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

}  // namespace sqkv
